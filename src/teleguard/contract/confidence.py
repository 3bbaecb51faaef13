"""The detector's confidence in an answer: the model's own probability of the label it wrote.

Trained models state `"confidence": 1.0` whatever they think (the training targets carry the grammar's
default), so teleguard reads the confidence from the answer tokens' log-probabilities instead. One definition
for every engine (ms-swift's transformers and vLLM engines, a remote OpenAI-compatible endpoint) and for the
offline evaluation:

- the **label span** of an answer is the JSON value literal of the round's key (`scene`, `is_fraud` or
  `fraud_type`) inside the answer object the contract's parser reads (the first ``<answer>`` block, its fenced
  ``json`` object, else its widest bare ``{...}``; the key's last top-level occurrence, as `json.loads` keeps
  it): ``true`` / ``false`` / ``null``, or a string *with its quotes*. The quotes belong to it because the
  opening one is where the model chooses a string over ``null`` and the closing one where it decides the label
  ends (``"投资"`` vs ``"投资诈骗"``);
- the **label tokens** are the generated tokens whose characters overlap the label span, so a token that also
  carries neighbouring characters (``": true``, ``",``) counts whole;
- the **confidence** is ``exp(sum of the label tokens' logprobs)``: the probability the model gave, token by
  token, to writing exactly that literal after what it had written before. Engines report log-probabilities of
  the model's own distribution before sampling (ms-swift reads them from the raw logits, vLLM's default
  `raw_logprobs` mode), so the confidence does not depend on the sampling temperature.

Tokens come as (text, logprob) pairs in generation order, each text the token decoded on its own (ms-swift's
`ChatCompletionResponseChoice.logprobs`, OpenAI's `logprobs.content`). A token holding only part of a
multi-byte character decodes to U+FFFD, and engines add text the tokens lack (ms-swift prefixes an empty
think block for non-thinking templates) or drop tokens from the text (``<|im_end|>``). So the span is located
in the tokens' own concatenation, where every token's position is exact, and checked against the answer text:
the two literals must agree, each run of U+FFFD standing for at least one character and whitespace ignored.

When there is no label span (no answer JSON, no value for the round, tokens that do not spell the answer) the
confidence is None and `LabelProbability.problem` says why; the policy reads a None confidence as 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from teleguard.contract.labels import Round
from teleguard.contract.parser import (
    _ANSWER,  # the parser's own patterns: the span is found exactly where parse_output reads the answer
    _BARE_JSON_WIDEST,
    _FENCED_JSON,
    _RAW_WHITESPACE,
    parse_output,
)

TokenLogprob = tuple[str, float]  # one generated token: its text decoded alone, its log-probability
ConfidenceSource = Literal["tokens", "stated"]

_REPLACEMENT = "\ufffd"  # what a token decodes to where it holds only part of a UTF-8 character
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class LabelProbability:
    """The model's probability of an answer's label (None when there is no label span, see `problem`)."""

    probability: float | None
    logprob: float | None = None  # the sum of the label tokens' logprobs
    tokens: tuple[int, ...] = ()  # indices of the label tokens in the token list
    problem: str | None = None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":  # JSON's whitespace
        i += 1
    return i


def _members(obj: str) -> dict[str, tuple[int, int]] | None:
    """Each top-level key of the JSON object text `obj` -> the span of its value literal (last one wins)."""
    spans: dict[str, tuple[int, int]] = {}
    try:
        i = _skip_ws(obj, 1)  # after the opening brace
        if obj[i] == "}":
            return spans
        while True:
            if obj[i] != '"':
                return None
            key, i = _DECODER.raw_decode(obj, i)
            i = _skip_ws(obj, i)
            if obj[i] != ":":
                return None
            start = _skip_ws(obj, i + 1)
            _, end = _DECODER.raw_decode(obj, start)
            spans[key] = (start, end)
            i = _skip_ws(obj, end)
            if obj[i] == "}":
                return spans
            if obj[i] != ",":
                return None
            i = _skip_ws(obj, i + 1)
    except (ValueError, IndexError, RecursionError):
        return None


def label_span(text: str, round_: Round | str) -> tuple[int, int] | None:
    """Where the JSON value literal of the round's key lies in `text` (see the module doc), or None."""
    key = Round(round_).value
    answer = _ANSWER.search(text)
    if answer is None:
        return None
    body = answer.group(1)
    offset = answer.start(1) + len(body) - len(body.lstrip())  # the parser strips the answer text
    body = body.strip()
    found = _FENCED_JSON.search(body) or _BARE_JSON_WIDEST.search(body)
    if found is None:
        return None
    obj = found.group(1)
    # as the parser's lenient load: raw newlines/tabs become spaces, which keeps every position
    members = _members(obj)
    if members is None:
        members = _members(_RAW_WHITESPACE.sub(" ", obj))
    if not members or key not in members:
        return None
    start, end = members[key]
    base = offset + found.start(1)
    return base + start, base + end


def _same_literal(spelled: str, written: str) -> bool:
    """Whether the tokens' literal is the text's: U+FFFD runs stand for 1+ characters, whitespace ignored."""
    spelled, written = _WHITESPACE.sub("", spelled), _WHITESPACE.sub("", written)
    if _REPLACEMENT not in spelled:
        return spelled == written
    pattern = ".+?".join(re.escape(part) for part in re.split(f"{_REPLACEMENT}+", spelled))
    return re.fullmatch(pattern, written, re.DOTALL) is not None


def label_probability(
    text: str, tokens: Sequence[TokenLogprob], round_: Round | str | None = None
) -> LabelProbability:
    """The model's probability of the label `text` answers, from its generated `tokens` (module doc).

    `round_` names the expected answer key, as for `parse_output` (by default the first one present).
    """
    parsed = parse_output(text, round_)
    if parsed.answer is None:
        return LabelProbability(None, problem="no label span: the output holds no answer JSON object")
    if parsed.round is None:
        return LabelProbability(
            None, problem="no label span: the answer names no scene, is_fraud or fraud_type"
        )
    key = parsed.round.value
    written = label_span(text, parsed.round)
    if key not in parsed.answer:
        return LabelProbability(None, problem=f"no label span: the answer JSON has no {key} value")
    if written is None:  # json.loads read a value that the member scan cannot place
        return LabelProbability(None, problem=f"no label span: the {key} value's place is not found")
    if not tokens:
        return LabelProbability(None, problem="no label span: the engine reported no generated tokens")
    spelled_text = "".join(t for t, _ in tokens)
    spelled = label_span(spelled_text, parsed.round)
    literal = text[written[0] : written[1]]
    if spelled is None or not _same_literal(spelled_text[spelled[0] : spelled[1]], literal):
        return LabelProbability(
            None,
            problem=f"no label span: the generated tokens do not spell the answer's {key} value {literal}",
        )
    start, end = spelled
    chosen: list[int] = []
    pos = 0
    for i, (token, _) in enumerate(tokens):
        token_end = pos + len(token)
        # a token that decodes to nothing counts when it sits inside the span (part of its first character)
        if (pos < end and token_end > start) or (pos == token_end and start <= pos < end):
            chosen.append(i)
        pos = token_end
    logprobs = [float(tokens[i][1]) for i in chosen]
    if any(math.isnan(lp) or lp == math.inf for lp in logprobs):
        return LabelProbability(None, tokens=tuple(chosen), problem="a label token's logprob is NaN or +inf")
    total = sum(logprobs)
    # logprobs are <= 0; rounding in an engine may put a certain token a hair above 0
    return LabelProbability(min(1.0, math.exp(total)), total, tuple(chosen))


@dataclass(frozen=True)
class AnswerConfidence:
    """The confidence a decision uses, the number the answer states, and where the former came from."""

    value: float | None  # token probability ("tokens"), else the stated one ("stated"); None: none
    stated: float | None  # the answer JSON's confidence when it is a number in [0, 1]
    source: ConfidenceSource
    problem: str | None = None  # why `value` is None although tokens were given


def read_confidence(
    text: str, round_: Round | str | None, tokens: Sequence[TokenLogprob] | None
) -> AnswerConfidence:
    """An answer's confidence: the label's token probability when the engine reported the answer's token
    log-probabilities (`tokens` not None), else the number the answer states (in [0, 1], else None)."""
    stated = parse_output(text, round_).confidence
    stated = stated if stated is not None and 0 <= stated <= 1 else None
    if tokens is None:
        return AnswerConfidence(stated, stated, "stated")
    found = label_probability(text, tokens, round_)
    return AnswerConfidence(found.probability, stated, "tokens", found.problem)


def token_logprobs(logprobs: object) -> tuple[TokenLogprob, ...] | None:
    """The (text, logprob) pairs of a chat choice's `logprobs` (`{"content": [{"token", "logprob", ...}]}`,
    ms-swift's and the OpenAI API's shape), or None when it holds none or not in that shape.

    A token's text is its `bytes` decoded when they are given (U+FFFD for a part of a character, what
    ms-swift and vLLM write in `token` too; OpenAI writes such a token as an escape sequence), else `token`.
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    out: list[TokenLogprob] = []
    for entry in content:
        if not isinstance(entry, dict):
            return None
        token, logprob, raw = entry.get("token"), entry.get("logprob"), entry.get("bytes")
        if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
            token = bytes(raw).decode("utf-8", errors="replace")
        if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, int | float):
            return None
        out.append((token, float(logprob)))
    return tuple(out)
