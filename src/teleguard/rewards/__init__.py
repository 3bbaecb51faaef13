"""teleguard's rewards as plain functions `fn(completions, **columns) -> list[float]`, by name in `REWARDS`.

`REWARDS` is the one registry: ms-swift reads the names `--reward_funcs` takes from it (through
`teleguard.plugins.swift_rewards`), and recipes name them.

SAFE-QAQ's rule rewards read model outputs through the one parser (`teleguard.contract.parse_output`). Dataset
columns arrive as lists aligned with `completions` (ms-swift and TRL pass every extra dataset column that way):

- `answers`: the gold label of the sample's round: a scene name, "fraud"/"normal", or a fraud-type name;
- `conversation_stage`: early_stage / late_stage / complete (whole calls are "complete").

Values follow SAFE-QAQ's reward code, with its defects fixed: every sample is scored with its own stage (the
adaptive reward used to hand the whole batch's stages to a subset), no `prompts` argument is needed, a missing
column raises an error that names it, and reward details are logged append-only and only when asked for.

Modules: `common` (the scale and the column check), `log` (the reward log), one per rule-reward family
(`format`, `classification`, `think_length`), and the model rewards `judge` (an LLM teacher judge) and
`classifier` (a fraud classifier), imported when first called.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import partial
from typing import Any

from teleguard.rewards.classification import (
    adaptive_classification,
    fraud_classification,
    fraud_type_classification,
    route_of,
    scene_classification,
    score_label,
    score_stage,
    stage_classification,
)
from teleguard.rewards.common import CORRECT, INVALID, WRONG, RewardFn
from teleguard.rewards.format import TRAILING_CHAR_COST, prompt_format, score_format
from teleguard.rewards.log import LOG_DIR_ENV, RewardLog, enable_reward_log
from teleguard.rewards.think_length import length_reward, think_length_penalty, think_length_reward

__all__ = [
    "CORRECT",
    "INVALID",
    "LOG_DIR_ENV",
    "MODEL_REWARDS",
    "REWARDS",
    "RULE_REWARDS",
    "TRAILING_CHAR_COST",
    "WRONG",
    "RewardFn",
    "RewardLog",
    "adaptive_classification",
    "enable_reward_log",
    "fraud_classification",
    "fraud_type_classification",
    "prompt_format",
    "route_of",
    "scene_classification",
    "score_format",
    "score_label",
    "score_stage",
    "stage_classification",
    "think_length_penalty",
    "think_length_reward",
]


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
    "think_length_reward_200": length_reward(
        "think_length_reward_200", partial(think_length_reward, target=200)
    ),
    "think_length_reward_300": length_reward(
        "think_length_reward_300", partial(think_length_reward, target=300)
    ),
    "think_length_penalty_200": length_reward(
        "think_length_penalty_200", partial(think_length_penalty, start=200, max_penalty=5.0)
    ),
    "think_length_penalty_300": length_reward(
        "think_length_penalty_300", partial(think_length_penalty, start=300, max_penalty=5.0)
    ),
    "think_length_penalty_500": length_reward(
        "think_length_penalty_500", partial(think_length_penalty, start=500, max_penalty=7.0)
    ),
    "teacher_judge": _lazy_reward("teacher_judge", "teleguard.rewards.judge"),  # LLM judge x 5.0
    # P(gold verdict | reasoning) x 5.0 on is_fraud rows, from TELEGUARD_CLASSIFIER_MODEL
    "fraud_classifier": _lazy_reward("fraud_classifier", "teleguard.rewards.classifier"),
}
# Backed by a model that must be configured (a judge endpoint, a classifier folder): used only when named.
MODEL_REWARDS = ("teacher_judge", "fraud_classifier")
# The rule rewards, each once (new_adaptive_classification is another name of adaptive_classification).
RULE_REWARDS = tuple(n for n in REWARDS if n not in (*MODEL_REWARDS, "new_adaptive_classification"))
