"""The classification rewards: each round's label (scene, is_fraud, fraud type) and the conversation stage.

Every sample is scored with its own stage (SAFE-QAQ's adaptive reward used to hand the whole batch's stages to
a subset), and `adaptive_classification` scores each sample by the round its gold answer belongs to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from teleguard.contract.labels import FRAUD, FRAUD_TYPE_NAMES, NORMAL, SCENE_NAMES, STAGES, Round, Stage
from teleguard.contract.parser import ParsedOutput, parse_output
from teleguard.rewards.common import CORRECT, INVALID, WRONG, column
from teleguard.rewards.log import record

logger = logging.getLogger(__name__)


def score_label(parsed: ParsedOutput, round_: Round, gold: Any, stage: Any) -> float:
    """Classification reward of one output for one round."""
    if parsed.answer is None:
        return WRONG
    label = parsed.answer.get(round_.value)
    if round_ is Round.FRAUD:
        if label is not None and not isinstance(label, bool):
            return INVALID
        if (label is True and gold == FRAUD) or (label is False and gold == NORMAL):
            return CORRECT
    else:
        allowed = SCENE_NAMES if round_ is Round.SCENE else FRAUD_TYPE_NAMES
        if label is not None and label not in allowed:
            return INVALID
        if label == gold:
            return CORRECT
    if label is None and stage == Stage.EARLY:
        return CORRECT
    return WRONG


def score_stage(parsed: ParsedOutput, gold_stage: Any) -> float:
    """Stage reward: the right stage, and never a 'complete' call with every label null."""
    if parsed.answer is None:
        return WRONG
    predicted = parsed.answer.get("conversation_stage")
    if predicted is not None and predicted not in STAGES:
        return INVALID
    all_null = all(parsed.answer.get(r.value) is None for r in Round)
    if Stage.COMPLETE in (gold_stage, predicted) and all_null:
        return INVALID
    return CORRECT if predicted == gold_stage else WRONG


def route_of(gold: Any) -> Round:
    """The round a gold answer belongs to. Unknown answers are scored as scenes, as SAFE-QAQ does."""
    if gold in SCENE_NAMES:
        return Round.SCENE
    if gold in (FRAUD, NORMAL):
        return Round.FRAUD
    if gold in FRAUD_TYPE_NAMES:
        return Round.FRAUD_TYPE
    logger.warning("gold answer %r is not a scene, fraud/normal or fraud type; scored as a scene", gold)
    return Round.SCENE


def _classification(
    name: str, round_: Round | None, completions: Sequence[Any], **columns: Any
) -> list[float]:
    n = len(completions)
    answers = column(columns, "answers", n, name)
    stages = column(columns, "conversation_stage", n, name)
    parsed = [parse_output(c) for c in completions]
    values = [
        score_label(p, round_ or route_of(gold), gold, stage)
        for p, gold, stage in zip(parsed, answers, stages, strict=True)
    ]
    record(name, parsed, values, answers=answers, conversation_stage=stages)
    return values


def scene_classification(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Round 1: +5 for the right scene (or null in early_stage), −3 for a label outside the 7 scenes."""
    return _classification("scene_classification", Round.SCENE, completions, **columns)


def fraud_classification(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Round 2: +5 for the right is_fraud (or null in early_stage), −3 for a non-boolean is_fraud."""
    return _classification("fraud_classification", Round.FRAUD, completions, **columns)


def fraud_type_classification(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Round 3: +5 for the right fraud type (or null in early_stage), −3 for a label outside the 8 types."""
    return _classification("fraud_type_classification", Round.FRAUD_TYPE, completions, **columns)


def adaptive_classification(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Each sample scored by the round its gold answer belongs to, with its own conversation stage."""
    return _classification("adaptive_classification", None, completions, **columns)


def stage_classification(completions: Sequence[Any], **columns: Any) -> list[float]:
    """+5 for the right conversation_stage, −3 for an unknown stage or a 'complete' answer with no label."""
    n = len(completions)
    stages = column(columns, "conversation_stage", n, "stage_classification")
    parsed = [parse_output(c) for c in completions]
    values = [score_stage(p, stage) for p, stage in zip(parsed, stages, strict=True)]
    record("stage_classification", parsed, values, conversation_stage=stages)
    return values
