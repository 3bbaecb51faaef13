"""Writing answers in the output grammar: reference answers for earlier rounds and SFT targets.

The inverse of the parser: `parse_output(format_answer(...))` gives back the same round, label, stage,
reason and confidence, and the format reward scores it 1.0.
"""

from __future__ import annotations

import json
from typing import Any

from teleguard.contract.labels import Round, Stage


def answer_object(
    round_: Round | str,
    label: Any,
    *,
    stage: Stage | str = Stage.COMPLETE,
    reason: str = "",
    confidence: float = 1.0,
) -> dict[str, Any]:
    round_ = Round(round_)
    return {"conversation_stage": str(stage), round_.value: label, "reason": reason, "confidence": confidence}


def format_answer(
    round_: Round | str,
    label: Any,
    *,
    stage: Stage | str = Stage.COMPLETE,
    reason: str = "",
    confidence: float = 1.0,
    think: str | None = None,
) -> str:
    """`<think>…</think>` (when given) then `<answer>` with a fenced JSON object."""
    obj = answer_object(round_, label, stage=stage, reason=reason, confidence=confidence)
    answer = f"<answer>\n```json\n{json.dumps(obj, ensure_ascii=False)}\n```\n</answer>"
    return answer if think is None else f"<think>\n{think}\n</think>\n{answer}"
