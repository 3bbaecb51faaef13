"""Rationale distillation (seed 003): a teacher model writes the reasoning, the student is SFT-trained on it.

The teacher sees each training prompt with its gold answer named (as seed 003 asks its 14B model to explain
a given label) and writes a rationale. The student's target is that rationale in `<think>` followed by the
gold answer in the output grammar (`teleguard.contract.format_answer`), so the answer is always right and the
reasoning is the teacher's. A rationale that is empty, or only tags, is dropped and counted, never padded.
No fixed rationale is written here: the prompts' earlier rounds carry the dataset's per-call reference answers
(teleguard.data.evidence), and the student's think is the teacher's own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from teleguard.contract import Round, parse_output
from teleguard.contract.answers import format_answer
from teleguard.contract.labels import FRAUD, NORMAL
from teleguard.engines import Engine, Prompt, SamplingParams, prompt_of_row
from teleguard.rewards import route_of

HINT = "（参考答案：{gold}。请先写出得到这个答案的推理过程。）"
_TAGS = re.compile(r"</?(think|answer)>")


def teacher_prompt(row: dict[str, Any]) -> Prompt:
    """The row's prompt with the gold answer named in its last user turn."""
    prompt = prompt_of_row(row)
    messages = [dict(m) for m in prompt.messages]
    last = messages[-1]
    if isinstance(last.get("content"), str):
        last["content"] = f"{last['content']}\n{HINT.format(gold=row['answers'])}"
    return Prompt(messages=messages, audios=prompt.audios)


def rationale_of(output: str, max_chars: int) -> str:
    """The teacher's reasoning: its `<think>` text, else everything before `<answer>`, tags removed."""
    parsed = parse_output(output)
    text = parsed.think if parsed.think else output.split("<answer>", 1)[0]
    return _TAGS.sub("", text).strip()[:max_chars].strip()


def student_target(row: dict[str, Any], rationale: str) -> str:
    gold = row["answers"]
    round_ = route_of(gold)
    label: Any = {FRAUD: True, NORMAL: False}.get(gold) if round_ is Round.FRAUD else gold
    return format_answer(
        round_,
        label,
        stage=row.get("conversation_stage", "complete"),
        reason=rationale[:200],
        think=rationale,
    )


def distill_rows(
    teacher: Engine,
    rows: Sequence[dict[str, Any]],
    params: SamplingParams,
    *,
    batch_size: int = 16,
    max_chars: int = 2000,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Student SFT rows from the teacher's rationales, and a report (kept, dropped, mean rationale length)."""
    kept: list[dict[str, Any]] = []
    dropped = 0
    lengths: list[int] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        outputs = teacher.generate([teacher_prompt(r) for r in batch], params)
        for row, outs in zip(batch, outputs, strict=True):
            rationale = rationale_of(outs[0], max_chars) if outs else ""
            if not rationale:
                dropped += 1
                continue
            lengths.append(len(rationale))
            prompt = prompt_of_row(row)
            meta = {k: v for k, v in row.items() if k != "messages"}
            target = {"role": "assistant", "content": student_target(row, rationale)}
            kept.append({"messages": [*prompt.messages, target], **meta})
    report = {
        "prompts": len(rows),
        "kept": len(kept),
        "dropped_empty": dropped,
        "mean_rationale_chars": sum(lengths) / len(lengths) if lengths else 0.0,
    }
    return kept, report
