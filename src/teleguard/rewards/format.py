"""The format reward: the <think>..</think><answer>..</answer> layout and a well-formed answer object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from teleguard.contract.parser import ParsedOutput, parse_output
from teleguard.rewards.log import record

TRAILING_CHAR_COST = 0.001


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


def prompt_format(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Format reward, in [0, 1] less the trailing-text cost."""
    parsed = [parse_output(c) for c in completions]
    values = [score_format(p) for p in parsed]
    record("prompt_format", parsed, values)
    return values
