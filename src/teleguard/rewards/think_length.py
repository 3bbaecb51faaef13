"""The reasoning-length rewards: a reward for reasoning up to a target length, a penalty beyond a start."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from teleguard.contract.parser import ParsedOutput, parse_output
from teleguard.rewards.common import RewardFn
from teleguard.rewards.log import record


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


def _think_length(
    name: str, score: Callable[[ParsedOutput], float], completions: Sequence[Any], **columns: Any
) -> list[float]:
    parsed = [parse_output(c) for c in completions]
    values = [score(p) for p in parsed]
    record(name, parsed, values)
    return values


def length_reward(name: str, score: Callable[[ParsedOutput], float]) -> RewardFn:
    """A reward function named `name` that scores each completion's parsed output with `score`."""
    fn = partial(_think_length, name, score)
    fn.__name__ = name  # type: ignore[attr-defined]  # trainers log rewards under their function's name
    return fn
