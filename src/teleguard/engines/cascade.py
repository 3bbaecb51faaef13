"""A confidence cascade: a small engine answers every request first; its unsure answers go to a larger engine.

`CascadeEngine` is an engine like the others (an async `generate(requests) -> answers`, `aclose`), built by
`teleguard.engines.factory.build_engine` when `EngineConfig.cascade` is set. Per engine invocation:

1. every request goes to the small engine (the `EngineConfig` around the cascade);
2. each small answer is read with the contract's one parser (`parse_output`, for the request's round), and
   the request is *escalated* when the answer is unsure (`escalation_reason`):
   - ``unparsable``: the parser finds no answer JSON object (no ``<answer>`` block, a truncated one, JSON that
     does not parse);
   - ``no_confidence``: the answer has no confidence: when the small engine reported the answer tokens'
     log-probabilities, no label span to read the model's probability from (`teleguard.contract.confidence`);
     otherwise no numeric stated confidence in [0, 1] (the policy reads such a confidence as missing too);
   - ``low_confidence``: its confidence is below `CascadeConfig.threshold` (equal to it is confident). The
     confidence is the one the policy decides on: the model's token probability of its label, the stated
     number only for an engine without log-probabilities.
   Nothing else is checked: a confident answer with a null or invalid label (e.g. "insufficient information")
   stands, as the policy would read it from the small engine alone;
3. only the escalated requests go to the large engine, in one invocation, under the large engine's own
   deadline (`CascadeConfig.large.timeout_s`); each escalated request is answered with the large engine's
   generation, marked as escalated (`CascadeGeneration`);
4. if the large engine fails or misses its deadline, the small engine's answers stand for those requests
   (marked escalated, answered by "small", with the error) and `teleguard_cascade_escalation_failures_total`
   counts each of them by kind (timeout, error). The decision is made on the small answer: no 503.

A failure of the small engine fails the invocation as with any engine (the detector answers 503), and so does
the detector's deadline on the whole invocation (`EngineConfig.timeout_s` / `DetectorConfig.engine_timeout_s`,
which must cover small and large: the config requires `large.timeout_s < timeout_s`).

Answers are `CascadeGeneration`s, a `Generation` subclass, so every consumer of a `Generation` keeps working;
their `tokens` are the tokens both engines generated for the request (the cost of the answer). Counted in
the bound metrics (the detector's `DetectorMetrics`) per request: `teleguard_cascade_decisions_total{answered_by}`,
`teleguard_cascade_escalations_total{reason}` and `teleguard_cascade_escalation_failures_total{kind}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from teleguard.contract import Round, parse_output
from teleguard.contract.confidence import TokenLogprob, read_confidence
from teleguard.engines.contract import (
    CascadeConfig,
    EngineRequest,
    Generate,
    Generation,
    as_generations,
    error_kind,
)
from teleguard.engines.wrappers import close_engine, with_timeout

log = logging.getLogger(__name__)

__all__ = [
    "AnsweredBy",
    "CascadeConfig",
    "CascadeEngine",
    "CascadeGeneration",
    "CascadeMetrics",
    "EscalationReason",
    "escalation_reason",
]


class EscalationReason(StrEnum):
    """Why a cascade sent a request to its large engine."""

    LOW_CONFIDENCE = "low_confidence"  # the small answer's confidence is below the threshold
    NO_CONFIDENCE = "no_confidence"  # the answer JSON has no confidence in [0, 1]
    UNPARSABLE = "unparsable"  # no answer JSON object at all (no <answer>, truncated, broken JSON)


class AnsweredBy(StrEnum):
    """Which engine of a cascade gave the answer a decision was made on."""

    SMALL = "small"
    LARGE = "large"


class CascadeMetrics(Protocol):
    """Where a cascade counts (`teleguard.serve.metrics.DetectorMetrics` in the server): the engines do not
    depend on the serving metrics; the detector binds its own."""

    def cascade_decision(self, answered_by: AnsweredBy | str) -> None: ...

    def cascade_escalation(self, reason: EscalationReason | str) -> None: ...

    def cascade_escalation_failure(self, kind: str) -> None: ...


class _Uncounted:
    """A cascade's counts before any metrics are bound (an engine used outside a detector)."""

    def cascade_decision(self, answered_by: AnsweredBy | str) -> None:
        pass

    def cascade_escalation(self, reason: EscalationReason | str) -> None:
        pass

    def cascade_escalation_failure(self, kind: str) -> None:
        pass


_UNCOUNTED = _Uncounted()


def answer_confidence(
    text: str, round_: Round | str | None = None, logprobs: Sequence[TokenLogprob] | None = None
) -> float | None:
    """The confidence of an answer as the policy reads it (`teleguard.contract.confidence.read_confidence`):
    the label's token probability when `logprobs` are given, else the stated number in [0, 1]; else None."""
    return read_confidence(text, round_, logprobs).value


def escalation_reason(
    text: str,
    round_: Round | str | None,
    threshold: float,
    *,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> EscalationReason | None:
    """Why an answer must be asked again of the large engine, or None when it is confident enough.

    unparsable (no answer JSON object), no_confidence (`answer_confidence` is None), low_confidence (below
    `threshold`). The same rule serves `teleguard.evaluate.cascade`, so the offline evaluation escalates
    exactly what the server would.
    """
    parsed = parse_output(text, round_)
    if parsed.answer is None:
        return EscalationReason.UNPARSABLE
    confidence = answer_confidence(text, round_, logprobs)
    if confidence is None:
        return EscalationReason.NO_CONFIDENCE
    return EscalationReason.LOW_CONFIDENCE if confidence < threshold else None


@dataclass(frozen=True)
class CascadeGeneration(Generation):
    """A cascade's answer to one request: the answer used, and how the cascade came to it.

    `text` (and `logprobs`) is the large engine's answer when `answered_by` is "large", else the small
    engine's. `escalation` is why the request went to the large engine (None: the small answer was confident);
    `small_confidence` the small answer's confidence as the escalation rule read it; `escalation_error` says
    why the large engine's answer is missing when an escalated request was answered by "small".
    """

    answered_by: AnsweredBy = AnsweredBy.SMALL
    escalation: EscalationReason | None = None
    small_confidence: float | None = None
    small_text: str | None = None  # the small engine's answer, kept when the request was escalated
    escalation_error: str | None = None

    @property
    def escalated(self) -> bool:
        return self.escalation is not None


def _tokens(*counts: int | None) -> int | None:
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


class CascadeEngine:
    """Small engine first, large engine for the requests the small one is unsure of (see the module doc)."""

    kind = "cascade"

    def __init__(
        self,
        small: Generate,
        large: Generate,
        *,
        threshold: float,
        large_timeout_s: float | None = None,
        metrics: CascadeMetrics | None = None,
    ) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.small, self.large = small, large
        self.threshold = threshold
        self._large = large if large_timeout_s is None else with_timeout(large, large_timeout_s)
        self._metrics = metrics

    @property
    def metrics(self) -> CascadeMetrics:
        """Where the cascade counts: the bound metrics (a detector binds its own), else nowhere."""
        return self._metrics if self._metrics is not None else _UNCOUNTED

    def bind_metrics(self, metrics: CascadeMetrics) -> None:
        """Count in `metrics` from now on (the detector's, when it was built with its own registry)."""
        self._metrics = metrics

    async def generate(self, requests: Sequence[EngineRequest]) -> list[CascadeGeneration]:
        requests = list(requests)
        if not requests:
            return []
        small = as_generations(list(await self.small(requests)), len(requests))
        reasons = [
            escalation_reason(answer.text, request.round, self.threshold, logprobs=answer.logprobs)
            for request, answer in zip(requests, small, strict=True)
        ]
        metrics = self.metrics
        escalate: list[int] = []
        for i, reason in enumerate(reasons):
            if reason is not None:
                escalate.append(i)
                metrics.cascade_escalation(reason)
        large: dict[int, Generation] = {}
        error: str | None = None
        if escalate:
            try:
                answers = await self._large([requests[i] for i in escalate])
                large = dict(zip(escalate, as_generations(list(answers), len(escalate)), strict=True))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                kind = error_kind(err)
                error = f"{kind}: {err}"
                log.warning(
                    "cascade: the large engine failed on %d escalated request(s) (%s); the small engine's "
                    "answers stand",
                    len(escalate),
                    error,
                )
                for _ in escalate:
                    metrics.cascade_escalation_failure(kind)
        out: list[CascadeGeneration] = []
        for i, (request, answer) in enumerate(zip(requests, small, strict=True)):
            reason = reasons[i]
            confidence = answer_confidence(answer.text, request.round, answer.logprobs)
            if reason is None:
                result = CascadeGeneration(
                    answer.text, answer.tokens, answer.logprobs, small_confidence=confidence
                )
            elif i in large:
                result = CascadeGeneration(
                    large[i].text,
                    _tokens(answer.tokens, large[i].tokens),
                    large[i].logprobs,
                    answered_by=AnsweredBy.LARGE,
                    escalation=reason,
                    small_confidence=confidence,
                    small_text=answer.text,
                )
            else:
                result = CascadeGeneration(
                    answer.text,
                    answer.tokens,
                    answer.logprobs,
                    escalation=reason,
                    small_confidence=confidence,
                    small_text=answer.text,
                    escalation_error=error,
                )
            metrics.cascade_decision(result.answered_by)
            out.append(result)
        return out

    __call__ = generate

    async def aclose(self) -> None:
        try:
            await close_engine(self.small)
        finally:
            await close_engine(self.large)
