"""Reading a score from the judge's answer: the expected value over the score tokens' log-probabilities, or
the first integer 1..5 in the text."""

from __future__ import annotations

import math
import re
from typing import Any

_FULLWIDTH = str.maketrans("１２３４５", "12345")
_THINK_BLOCK = re.compile(r"<think>[\s\S]*?</think>|<think>[\s\S]*$")
_SCORE_IN_TEXT = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def _score_token(token: Any) -> int | None:
    if not isinstance(token, str):
        return None
    t = token.strip().translate(_FULLWIDTH)
    return int(t) if t in ("1", "2", "3", "4", "5") else None


def score_from_logprobs(entries: Any) -> tuple[float, dict[int, float]] | None:
    """Expected score over P("1".."5") at the first generated score token (renormalised), with the probs.

    `entries` is `choices[0].logprobs.content`: one entry per generated token, each with `token`,
    `logprob` and `top_logprobs`. The position used is the first whose token is a score; if none is, the
    first position (its alternatives may still hold score tokens). None when no score token is there.
    """
    if not isinstance(entries, list) or not entries:
        return None
    entry = next(
        (e for e in entries if isinstance(e, dict) and _score_token(e.get("token")) is not None), entries[0]
    )
    if not isinstance(entry, dict):
        return None
    logprobs: dict[str, float] = {}
    for alt in entry.get("top_logprobs") or []:
        if isinstance(alt, dict) and isinstance(alt.get("logprob"), int | float):
            logprobs.setdefault(alt.get("token"), float(alt["logprob"]))
    if isinstance(entry.get("logprob"), int | float):
        logprobs.setdefault(entry.get("token"), float(entry["logprob"]))
    probs: dict[int, float] = {}
    for token, lp in logprobs.items():
        score = _score_token(token)
        if score is not None and math.isfinite(lp):
            probs[score] = probs.get(score, 0.0) + math.exp(lp)
    mass = sum(probs.values())
    if mass <= 0:
        return None
    return sum(s * p for s, p in probs.items()) / mass, {s: p for s, p in sorted(probs.items())}


def score_from_text(content: Any) -> int | None:
    """The first integer 1..5 standing alone in the answer text, after any <think> block; else None."""
    if not isinstance(content, str):
        return None
    match = _SCORE_IN_TEXT.search(_THINK_BLOCK.sub(" ", content).translate(_FULLWIDTH))
    return int(match.group(1)) if match else None
