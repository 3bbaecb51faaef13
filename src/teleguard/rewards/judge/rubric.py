"""The rubric: what the judge is asked about one sample, for each criterion, in Chinese or English."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teleguard.contract.parser import parse_output
from teleguard.rewards.judge.config import Criterion, JudgeConfig

PROMPT_VERSION = "teleantifraud-rubric-v1"  # bump when the prompts change meaning (it is part of cache keys)

_PROMPTS: dict[str, dict[str, Any]] = {
    "zh": {
        "system": "你是电话反诈领域的资深审核专家，负责评价反诈检测模型对通话的推理质量。你只输出一个数字。",
        "context": "## 通话与提问\n{context}",
        "reference": "## 参考答案\n正确结论：{gold}\n通话阶段：{stage}",
        "rationale": "参考理由：{reference}",
        "output": "## 待评价的模型输出\n推理过程：\n{think}\n\n最终回答：\n{answer}",
        "criterion": "## 评价维度：{title}\n{description}\n\n评分标准：1 = 很差，2 = 较差，3 = 一般，4 = 良好，5 = 优秀。\n"
        "请只输出一个 1 到 5 之间的整数，不要输出任何其他内容。",
        "none": "（无）",
        "criteria": {
            "logical_rigour": (
                "逻辑严谨性",
                "推理是否以通话内容为依据、论证前后一致、没有自相矛盾或凭空臆断，并且得出与参考答案一致的结论。",
            ),
            "practical_value": (
                "实用价值",
                "推理是否指出了可据以识别诈骗或确认正常的具体线索（如冒充身份、索要验证码、诱导转账），"
                "对用户防范诈骗是否有实际帮助。",
            ),
            "expression_quality": (
                "表达质量",
                "表达是否清晰、简洁、有条理，没有重复和乱码，并符合输出格式（<think> 推理后接 <answer> JSON）。",
            ),
        },
    },
    "en": {
        "system": "You are a senior reviewer of phone-fraud detection. You rate a detector's reasoning about a "
        "call. You answer with a single digit.",
        "context": "## Call and question\n{context}",
        "reference": "## Reference\nCorrect conclusion: {gold}\nConversation stage: {stage}",
        "rationale": "Reference rationale: {reference}",
        "output": "## Output to rate\nReasoning:\n{think}\n\nFinal answer:\n{answer}",
        "criterion": "## Criterion: {title}\n{description}\n\nScale: 1 = very poor, 2 = poor, 3 = fair, "
        "4 = good, 5 = excellent.\nAnswer with one integer from 1 to 5 and nothing else.",
        "none": "(none)",
        "criteria": {
            "logical_rigour": (
                "logical rigour",
                "Is the reasoning grounded in the call, consistent, free of contradictions and unsupported "
                "claims, and does it reach the reference conclusion?",
            ),
            "practical_value": (
                "practical value",
                "Does the reasoning name concrete cues that identify fraud or confirm a normal call "
                "(impersonation, requests for codes, pressure to transfer money) that would help a listener?",
            ),
            "expression_quality": (
                "expression quality",
                "Is it clear, concise and orderly, without repetition or garbage, in the required format "
                "(<think> reasoning, then an <answer> JSON)?",
            ),
        },
    },
}


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees of one sample."""

    completion: Any
    gold: Any
    stage: Any = None
    reference: Any = None  # a reference rationale, if the dataset has one
    context: Any = None  # the sample's `messages` (the prompt the policy answered)


def message_text(content: Any) -> str:
    """Message content as text: strings, OpenAI parts (text kept, media as placeholders), nested lists."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "text" in content:
            return message_text(content["text"])
        if "content" in content:
            return message_text(content["content"])
        kind = str(content.get("type", "media"))
        return f"[{kind}]"
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return str(content)


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail, joined by an ellipsis."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = limit * 2 // 3
    tail = limit - head - 1
    return text[:head] + "…" + (text[-tail:] if tail > 0 else "")


def _context(messages: Any, completion: str, limit: int) -> str:
    """The conversation the policy answered, without the system prompt and the completion ms-swift appends."""
    if not isinstance(messages, list | tuple) or not messages:
        return ""
    turns = [m for m in messages if isinstance(m, dict)]
    if (
        turns
        and turns[-1].get("role") == "assistant"
        and message_text(turns[-1].get("content")) == completion
    ):
        turns = turns[:-1]
    lines = [
        f"{m.get('role', 'user')}: {message_text(m.get('content'))}"
        for m in turns
        if m.get("role") != "system"
    ]
    return _clip("\n".join(lines), limit)


def judge_messages(item: JudgeItem, criterion: Criterion, config: JudgeConfig) -> list[dict[str, str]]:
    """The chat messages asking the judge to score `item` on one criterion."""
    p = _PROMPTS[config.language]
    completion = message_text(item.completion)
    parsed = parse_output(completion)
    think = parsed.think if parsed.think is not None else ""
    answer = parsed.answer_text if parsed.answer_text is not None else ""
    if parsed.think is None and parsed.answer_text is None:
        answer = completion  # no tags at all: show the whole output as the answer
    half = config.max_completion_chars // 2
    parts = []
    context = _context(item.context, completion, config.max_context_chars)
    if context:
        parts.append(p["context"].format(context=context))
    reference = p["reference"].format(
        gold=message_text(item.gold) if not isinstance(item.gold, bool) else str(item.gold).lower(),
        stage=message_text(item.stage) or p["none"],
    )
    if item.reference not in (None, ""):
        reference += "\n" + p["rationale"].format(reference=_clip(message_text(item.reference), half))
    parts.append(reference)
    parts.append(
        p["output"].format(think=_clip(think, half) or p["none"], answer=_clip(answer, half) or p["none"])
    )
    title, description = p["criteria"][criterion]
    parts.append(p["criterion"].format(title=title, description=description))
    return [{"role": "system", "content": p["system"]}, {"role": "user", "content": "\n\n".join(parts)}]
