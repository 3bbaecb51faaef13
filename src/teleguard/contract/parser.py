"""The one answer parser: any model output -> a typed `ParsedOutput`.

Rewards, rejection sampling, evaluation and serving all read a model's answer through `parse_output`, so
training and serving can never disagree about what a model said.

Output grammar: `<think>reasoning</think><answer>JSON</answer>`. The extraction rules reproduce SAFE-QAQ's
reward code exactly, because the rewards' values depend on them:

- think: the first `<think>...</think>`, surrounding whitespace trimmed;
- answer: the first `<answer>...</answer>`, trimmed; its JSON object is the first ```json fenced object, else the
  span from the first `{` to the last `}` (so nested objects parse); a span that fails to parse is retried with
  raw newlines and tabs replaced by spaces (models put raw newlines inside JSON strings);
- well-formed (the format reward's test): the tags in order, and an answer JSON object that carries a string
  conversation_stage, a string reason, a confidence in [0, 1] and the round key. For this test the bare-JSON
  span is the *shortest* `{...}` (SAFE-QAQ's rule), which is stricter with nested braces.

`parse_output` never raises on model output: whatever is wrong lands in `ParsedOutput.problems`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from teleguard.contract.labels import (
    FRAUD_TYPE_NAMES,
    SCENE_NAMES,
    STAGES,
    Round,
    normalize_fraud_type,
    normalize_scene,
)

_THINK = re.compile(r"<think>\s*([\s\S]*?)\s*</think>")
_ANSWER = re.compile(r"<answer>\s*([\s\S]*?)\s*</answer>")
_TAGS_IN_ORDER = re.compile(r"<think>[\s\S]*?</think>\s*<answer>[\s\S]*?</answer>")
_FENCED_JSON = re.compile(r"```(?:json)?\s*(\{[\s\S]*?\})\s*```")
_BARE_JSON_WIDEST = re.compile(r"(\{[\s\S]*\})")
_BARE_JSON_SHORTEST = re.compile(r"(\{[\s\S]*?\})")
_RAW_WHITESPACE = re.compile(r"[\n\r\t]")

# Think-length estimate (SAFE-QAQ): CJK characters and ASCII words count one each, as do these punctuation
# marks; every other character counts a quarter.
_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[a-zA-Z0-9]+")
_PUNCT = re.compile(r"[,.!?;:()\"'\-，。！？；：（）]")

# How a model says it cannot decide yet (the real-time prompts ask for this wording).
_INSUFFICIENT = re.compile(r"信息不足|信息不够|insufficient|not enough information", re.IGNORECASE)

ANSWER_END = "</answer>"


def estimate_think_length(text: str) -> float:
    """SAFE-QAQ's token estimate of a reasoning text (no tokenizer needed, same for every model)."""
    cjk = len(_CJK.findall(text))
    words = len(_WORD.findall(text))
    punct = len(_PUNCT.findall(text))
    other = len(text) - cjk
    return cjk + words + punct + (other - words - punct) / 4


def loads_lenient(text: str) -> Any:
    """json.loads, retried once with raw newlines/tabs turned into spaces. Raises ValueError if both fail."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(_RAW_WHITESPACE.sub(" ", text))


def _json_object(answer_text: str, bare: re.Pattern[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The answer's JSON object and, if there is none, why not."""
    match = _FENCED_JSON.search(answer_text) or bare.search(answer_text)
    if match is None:
        return None, "the answer holds no JSON object"
    try:
        obj = loads_lenient(match.group(1))
    except (ValueError, RecursionError) as err:
        return None, f"the answer JSON does not parse: {err}"
    return obj, None  # a span that starts with '{' and parses is always a dict


def _is_confidence(value: Any) -> bool:
    # bool counts as a number here, as in SAFE-QAQ's format reward (True == 1).
    return isinstance(value, int | float) and 0 <= value <= 1


def _schema_ok(obj: dict[str, Any]) -> bool:
    """The format reward's test of the answer object, for any of the three rounds."""
    if not (
        "conversation_stage" in obj
        and "reason" in obj
        and "confidence" in obj
        and isinstance(obj["conversation_stage"], str)
        and isinstance(obj["reason"], str)
        and _is_confidence(obj["confidence"])
    ):
        return False
    return (
        ("scene" in obj and (obj["scene"] is None or isinstance(obj["scene"], str)))
        or ("is_fraud" in obj and (obj["is_fraud"] is None or isinstance(obj["is_fraud"], bool)))
        or ("fraud_type" in obj and (obj["fraud_type"] is None or isinstance(obj["fraud_type"], str)))
    )


@dataclass(frozen=True)
class ParsedOutput:
    """Everything teleguard reads from one model output."""

    text: str
    think: str | None = None
    think_length: float = 0.0
    answer_text: str | None = None
    answer: dict[str, Any] | None = None
    round: Round | None = None
    label: Any = None  # the round's value as the model wrote it (str, bool, None or anything else)
    conversation_stage: Any = None
    confidence: float | None = None
    reason: str | None = None
    insufficient: bool = False
    has_tags: bool = False  # <think>..</think> then <answer>..</answer>
    well_formed: bool = False  # has_tags and the answer object passes the format test
    trailing: str = ""  # text after the last </answer>, trimmed
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def canonical_label(self) -> str | bool | None:
        """The label mapped to its canonical name (English names and aliases accepted), if it is a valid one."""
        value = self.label
        if self.round is Round.FRAUD:
            return value if isinstance(value, bool) else None
        if not isinstance(value, str):
            return None
        if self.round is Round.SCENE:
            return normalize_scene(value)
        if self.round is Round.FRAUD_TYPE:
            return normalize_fraud_type(value)
        return None


def parse_output(text: Any, round: Round | str | None = None) -> ParsedOutput:
    """Parse one model output. `round` names the expected answer key; by default the first one present."""
    expected = Round(round) if round is not None else None
    text = _as_text(text)
    try:
        return _parse_cached(text, expected)
    except Exception as err:  # never raise on model output; a parser bug shows up as a problem
        return ParsedOutput(text=text, problems=(f"parser error: {type(err).__name__}: {err}",))


def _as_text(completion: Any) -> str:
    """Model outputs arrive as strings, or as chat messages from some trainers."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _as_text(completion.get("content", ""))
    if isinstance(completion, list):
        return "".join(_as_text(part) for part in completion)
    return "" if completion is None else str(completion)


# Every reward parses the same completions: caching makes the full reward set cost one parse per output.
@lru_cache(maxsize=2048)
def _parse_cached(text: str, expected: Round | None) -> ParsedOutput:
    problems: list[str] = []

    think_match = _THINK.search(text)
    think = think_match.group(1) if think_match else None
    if think is None:
        problems.append(
            "output ends inside <think> (truncated)" if "<think>" in text else "no <think>...</think> block"
        )

    answer_match = _ANSWER.search(text)
    answer_text = answer_match.group(1).strip() if answer_match else None
    answer: dict[str, Any] | None = None
    if answer_text is None:
        problems.append(
            "output ends inside <answer> (truncated)"
            if "<answer>" in text
            else "no <answer>...</answer> block"
        )
    else:
        answer, why = _json_object(answer_text, _BARE_JSON_WIDEST)
        if why:
            problems.append(why)

    has_tags = _TAGS_IN_ORDER.search(text) is not None
    if think is not None and answer_text is not None and not has_tags:
        problems.append("<think> and <answer> are not in order")
    trailing = text.split(ANSWER_END)[-1].strip() if ANSWER_END in text else ""
    if trailing:
        problems.append(f"{len(trailing)} characters after </answer>")

    well_formed = False
    if has_tags and answer_text is not None:
        strict, _ = _json_object(answer_text, _BARE_JSON_SHORTEST)
        well_formed = strict is not None and _schema_ok(strict)

    fields = _answer_fields(answer, expected, problems) if answer is not None else {}
    insufficient = bool(
        answer_text is not None and fields.get("label") is None and _INSUFFICIENT.search(answer_text)
    )
    if answer_text is not None and not well_formed and answer is not None:
        problems.append("the answer JSON lacks a required field or has a wrong type")
    return ParsedOutput(
        text=text,
        think=think,
        think_length=estimate_think_length(think) if think is not None else 0.0,
        answer_text=answer_text,
        answer=answer,
        insufficient=insufficient,
        has_tags=has_tags,
        well_formed=well_formed,
        trailing=trailing,
        problems=tuple(problems),
        **fields,
    )


def _answer_fields(answer: dict[str, Any], expected: Round | None, problems: list[str]) -> dict[str, Any]:
    round_ = expected or next((r for r in Round if r.value in answer), None)
    label = answer.get(round_.value) if round_ else None
    if round_ is None:
        problems.append("the answer names no scene, is_fraud or fraud_type")
    elif label is not None:
        allowed: tuple[Any, ...] = {
            Round.SCENE: SCENE_NAMES,
            Round.FRAUD_TYPE: FRAUD_TYPE_NAMES,
            Round.FRAUD: (True, False),
        }[round_]
        if not any(label is a if isinstance(a, bool) else label == a for a in allowed):
            problems.append(f"{round_.value} {label!r} is not one of the allowed labels")

    stage = answer.get("conversation_stage")
    if stage is not None and stage not in STAGES:
        problems.append(f"conversation_stage {stage!r} is not one of {', '.join(STAGES)}")

    confidence = answer.get("confidence")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
    ):
        confidence = None
    reason = answer.get("reason")
    return {
        "round": round_,
        "label": label,
        "conversation_stage": stage,
        "confidence": float(confidence) if confidence is not None else None,
        "reason": reason if isinstance(reason, str) else None,
    }
