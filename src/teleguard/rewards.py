"""SAFE-QAQ's rule-based rewards as plain functions `fn(completions, **columns) -> list[float]`.

Every function reads model outputs through the one parser (`teleguard.contract.parse_output`). Dataset columns
arrive as lists aligned with `completions` (ms-swift and TRL pass every extra dataset column that way):

- `answers`: the gold label of the sample's round: a scene name, "fraud"/"normal", or a fraud-type name;
- `conversation_stage`: early_stage / late_stage / complete (whole calls are "complete").

Values follow SAFE-QAQ's reward code, with its defects fixed: every sample is scored with its own stage (the
adaptive reward used to hand the whole batch's stages to a subset), no `prompts` argument is needed, a missing
column raises an error that names it, and reward details are logged append-only and only when asked for.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

from teleguard.contract.labels import FRAUD, FRAUD_TYPE_NAMES, NORMAL, SCENE_NAMES, STAGES, Round, Stage
from teleguard.contract.parser import ParsedOutput, parse_output

RewardFn = Callable[..., list[float]]

CORRECT = 5.0  # the right label, or a null label where the call is still in its early stage
INVALID = -3.0  # a label outside the closed set (or a non-boolean is_fraud), or an impossible stage answer
WRONG = 0.0  # a wrong but valid label, no answer, or an unparsable answer
TRAILING_CHAR_COST = 0.001

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- columns


def _column(columns: dict[str, Any], name: str, n: int, reward: str) -> Sequence[Any]:
    if name not in columns or columns[name] is None:
        raise ValueError(
            f"reward {reward!r} needs the dataset column {name!r}, which is missing "
            f"(columns given: {sorted(k for k in columns if not k.startswith('_'))})"
        )
    values = columns[name]
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"reward {reward!r}: column {name!r} must be a list with one value per completion")
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return values


# ----------------------------------------------------------------------------------------------- scoring rules


def score_format(parsed: ParsedOutput) -> float:
    """+0.5 for <think>..</think><answer>..</answer>, +0.5 for a well-formed answer object, minus trailing text.

    Text after the last </answer> costs 0.001 per character beyond the first; a single character costs 0.001.
    """
    if not parsed.has_tags:
        return 0.0
    reward = 0.5
    if parsed.well_formed:
        reward += 0.5
    n = len(parsed.trailing)
    if n:
        reward -= (n - 1 if n > 1 else n) * TRAILING_CHAR_COST
    return reward


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


def think_length_reward(parsed: ParsedOutput, target: int, max_reward: float = 5.0) -> float:
    """Rewards reasoning up to `target` estimated tokens: max·ln(t+1)/ln(target+1), at least a tenth of max."""
    if parsed.think is None:
        return 0.0
    t = parsed.think_length
    if t > target:
        return max_reward
    reward = math.log(t + 1) / math.log(target + 1) * max_reward
    if t > 0 and reward < 0.1 * max_reward:
        reward = 0.1 * max_reward
    return reward


def think_length_penalty(parsed: ParsedOutput, start: int, max_penalty: float) -> float:
    """Penalises reasoning beyond `start` tokens: −clip(max·ln(t−start+10)/ln(1000), max/10, max)."""
    if parsed.think is None or parsed.think_length <= start:
        return 0.0
    penalty = math.log(parsed.think_length - start + 10) / math.log(1000) * max_penalty
    return -min(max(penalty, 0.1 * max_penalty), max_penalty)


# ---------------------------------------------------------------------------------------------- reward logging


class RewardLog:
    """Append-only JSON-lines log of reward details, one file per process rank.

    Appending keeps the cost of a call the same at the millionth call as at the first, and one writer per
    rank means concurrent ranks never write the same file.
    """

    def __init__(self, directory: Path) -> None:
        rank = os.environ.get("RANK", "0")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rewards-rank{rank}.jsonl"
        self._file: IO[str] = self.path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def write(self, reward: str, rows: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps({"reward": reward, **row}, ensure_ascii=False) + "\n" for row in rows)
        with self._lock:
            self._file.write(lines)

    def close(self) -> None:
        self._file.close()


_log: RewardLog | None = None
LOG_DIR_ENV = "TELEGUARD_REWARD_LOG_DIR"


def enable_reward_log(directory: str | Path | None) -> RewardLog | None:
    """Turn the reward log on (a directory) or off (None). Also on when TELEGUARD_REWARD_LOG_DIR is set."""
    global _log
    if _log is not None:
        _log.close()
    _log = RewardLog(Path(directory)) if directory else None
    return _log


if os.environ.get(LOG_DIR_ENV):
    enable_reward_log(os.environ[LOG_DIR_ENV])


def _record(name: str, parsed: list[ParsedOutput], values: list[float], **columns: Sequence[Any]) -> None:
    if _log is None:
        return
    rows = [
        {
            "value": value,
            **{key: col[i] for key, col in columns.items()},
            "problems": list(p.problems),
            "think_length": p.think_length,
        }
        for i, (p, value) in enumerate(zip(parsed, values, strict=True))
    ]
    _log.write(name, rows)


# ----------------------------------------------------------------------------------------- reward functions


def prompt_format(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Format reward, in [0, 1] less the trailing-text cost."""
    parsed = [parse_output(c) for c in completions]
    values = [score_format(p) for p in parsed]
    _record("prompt_format", parsed, values)
    return values


def _classification(
    name: str, round_: Round | None, completions: Sequence[Any], **columns: Any
) -> list[float]:
    n = len(completions)
    answers = _column(columns, "answers", n, name)
    stages = _column(columns, "conversation_stage", n, name)
    parsed = [parse_output(c) for c in completions]
    values = [
        score_label(p, round_ or route_of(gold), gold, stage)
        for p, gold, stage in zip(parsed, answers, stages, strict=True)
    ]
    _record(name, parsed, values, answers=answers, conversation_stage=stages)
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
    stages = _column(columns, "conversation_stage", n, "stage_classification")
    parsed = [parse_output(c) for c in completions]
    values = [score_stage(p, stage) for p, stage in zip(parsed, stages, strict=True)]
    _record("stage_classification", parsed, values, conversation_stage=stages)
    return values


def _think_length(
    name: str, score: Callable[[ParsedOutput], float], completions: Sequence[Any], **columns: Any
) -> list[float]:
    parsed = [parse_output(c) for c in completions]
    values = [score(p) for p in parsed]
    _record(name, parsed, values)
    return values


def _length_reward(name: str, score: Callable[[ParsedOutput], float]) -> RewardFn:
    fn = partial(_think_length, name, score)
    fn.__name__ = name  # type: ignore[attr-defined]  # trainers log rewards under their function's name
    return fn


def _lazy_reward(name: str, module: str) -> RewardFn:
    """`module.name`, imported at the first call (the teacher judge needs httpx, rule rewards do not)."""

    def fn(completions: Sequence[Any], **columns: Any) -> list[float]:
        return getattr(importlib.import_module(module), name)(completions, **columns)

    fn.__name__ = name
    fn.__doc__ = f"{module}.{name} (imported when first called)"
    return fn


REWARDS: dict[str, RewardFn] = {
    "prompt_format": prompt_format,
    "scene_classification": scene_classification,
    "fraud_classification": fraud_classification,
    "fraud_type_classification": fraud_type_classification,
    "adaptive_classification": adaptive_classification,
    "new_adaptive_classification": adaptive_classification,  # the name SAFE-QAQ's scripts use
    "stage_classification": stage_classification,
    "think_length_reward_200": _length_reward(
        "think_length_reward_200", partial(think_length_reward, target=200)
    ),
    "think_length_reward_300": _length_reward(
        "think_length_reward_300", partial(think_length_reward, target=300)
    ),
    "think_length_penalty_200": _length_reward(
        "think_length_penalty_200", partial(think_length_penalty, start=200, max_penalty=5.0)
    ),
    "think_length_penalty_300": _length_reward(
        "think_length_penalty_300", partial(think_length_penalty, start=300, max_penalty=5.0)
    ),
    "think_length_penalty_500": _length_reward(
        "think_length_penalty_500", partial(think_length_penalty, start=500, max_penalty=7.0)
    ),
    "teacher_judge": _lazy_reward("teacher_judge", "teleguard.judge"),  # LLM judge x 5.0, see teleguard.judge
    # P(gold verdict | reasoning) x 5.0 on is_fraud rows, from TELEGUARD_CLASSIFIER_MODEL; see train.classifier
    "fraud_classifier": _lazy_reward("fraud_classifier", "teleguard.train.classifier"),
}
