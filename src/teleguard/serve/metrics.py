"""Prometheus metrics of the real-time detector.

`DetectorMetrics` owns every `teleguard_*` metric in one `CollectorRegistry`. The default is prometheus_client's
global `REGISTRY` because KServe's `/metrics` route serves that registry; tests pass a fresh one. The rules in
`monitoring/prometheus/rules.yaml` are written against these names, and `exported_sample_names()` lists them so
a test can check that the rules only name series that exist.

Label values are bounded: scenes and fraud types are the contract's canonical names (any accepted spelling is
normalized), a missing label is "none" and anything else the model says is "unknown"; reject reasons, verdicts
and engine error kinds are closed sets. Free text never becomes a label value, so a misbehaving model cannot
blow up the number of series.

Conventions the server must follow for the rules to mean what they say:

- `observe_decision` once per evaluation at a policy point (one or more model calls), committed or not
  (an uncommitted one has label "none"); its latency is what the 3 s decision SLO is about.
- `model_call` once per engine invocation, failed ones included, and `engine_error` as well for a failed one,
  so that engine errors / model calls is an error ratio.
- `call_opened` once per call and `call_closed` exactly once per opened call (expired calls too, with
  `expired=True`), so that the active-calls gauge returns to zero and every call gets one verdict. With a
  shared session store a call may open on one replica and close on another: the replica that closes it counts
  the verdict (the store's close is atomic, so once), and the gauge is set from the calls each replica
  carries (`carried_calls`), so that its sum over replicas is still the number of open calls.
- `store_error` once per failed session store operation.
- a confidence cascade (`teleguard.engines.cascade`) counts per request (one round's answer), not per engine
  invocation: `cascade_decision` once for every request it answers (by the engine whose answer was used),
  `cascade_escalation` once for every request it sent to the large engine (by why), and
  `cascade_escalation_failure` once for every escalated request whose large answer failed or timed out (the
  small answer was used: answered_by "small"). The escalation rate is escalations / cascade decisions.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from functools import cache

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from teleguard.contract.labels import (
    FRAUD,
    FRAUD_TYPE_NAMES,
    NORMAL,
    SCENE_NAMES,
    Round,
    normalize_fraud_type,
    normalize_scene,
)
from teleguard.engines.cascade import AnsweredBy, EscalationReason  # the cascade's label values

PREFIX = "teleguard_"

# Chunk handling without a model call takes well under a millisecond to a few ms; a chunk that triggers a
# decision takes as long as the decision. Decisions take ~50 ms-2 s on CPU tiny models and ~0.2-3 s on a GPU
# with a 7B audio model against a 3 s SLO, hence the dense buckets between 0.5 s and 5 s. 3.0 must stay a
# bucket bound: the SLO rules read le="3.0" (prometheus_client writes floats with ".0").
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
)
DECISION_SLO_SECONDS = 3.0

# Seconds of call audio before the first fraud alert: early alerts come after a few turns, late ones minutes in.
TIME_TO_DETECTION_BUCKETS: tuple[float, ...] = (
    1.0,
    2.0,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    240.0,
    300.0,
    450.0,
    600.0,
)

NONE = "none"  # the model gave no label (null, insufficient information, or the round was not asked)
UNKNOWN = "unknown"  # the model gave a label outside the contract's set
OTHER = "other"  # a reject reason this module does not know yet


class Verdict(StrEnum):
    """A completed call's verdict; the fraud rate is fraud verdicts / all verdicts."""

    FRAUD = "fraud"
    NORMAL = "normal"
    UNDECIDED = "undecided"


class EngineErrorKind(StrEnum):
    TIMEOUT = "timeout"
    ERROR = "error"


_ENGINE_ERROR_KINDS = frozenset(kind.value for kind in EngineErrorKind)


REJECT_REASONS: tuple[str, ...] = (
    "invalid_base64",
    "wrong_sample_rate",
    "wrong_channels",
    "not_audio",
    "empty_chunk",
    "payload_too_large",
    "unknown_call",
    "closed_call",
    "too_many_calls",
    "sequence_gap",
    "out_of_order",
    "invalid_request",
    OTHER,
)

ROUND_VALUES: tuple[str, ...] = (*(r.value for r in Round), UNKNOWN)
DECISION_LABELS: tuple[str, ...] = (FRAUD, NORMAL, NONE, UNKNOWN)
SCENE_VALUES: tuple[str, ...] = (*SCENE_NAMES, NONE, UNKNOWN)
FRAUD_TYPE_VALUES: tuple[str, ...] = (*FRAUD_TYPE_NAMES, NONE, UNKNOWN)


def round_value(value: Round | str | None) -> str:
    """A decision's round as a bounded label value."""
    if value is None:
        return UNKNOWN
    try:
        return Round(value).value
    except ValueError:
        return UNKNOWN


def decision_label(value: bool | str | None) -> str:
    """The fraud/normal answer of a decision as a label value: True/False, "fraud"/"normal", or None."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return FRAUD if value else NORMAL
    text = value.strip().lower()
    if text in (FRAUD, NORMAL):
        return text
    return NONE if text in ("", NONE, "null") else UNKNOWN


def scene_value(value: str | None) -> str:
    """A canonical scene name, "none" for no scene, "unknown" for anything outside the contract."""
    if value is None or not value.strip():
        return NONE
    return normalize_scene(value) or UNKNOWN


def fraud_type_value(value: str | None) -> str:
    """A canonical fraud-type name, "none" for no type, "unknown" for anything outside the contract."""
    if value is None or not value.strip():
        return NONE
    return normalize_fraud_type(value) or UNKNOWN


def reject_reason(value: str) -> str:
    """A reject reason code; unknown codes are counted as "other" rather than growing a new series."""
    return value if value in REJECT_REASONS else OTHER


class DetectorMetrics:
    """The detector's Prometheus metrics, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        reg = self.registry
        self.chunk_latency = Histogram(
            f"{PREFIX}chunk_latency_seconds",
            "Time to handle one accepted chunk, including any decision it triggered.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decision_latency = Histogram(
            f"{PREFIX}decision_latency_seconds",
            "Time of one evaluation at a policy point (its model calls), committed or not.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decisions = Counter(
            f"{PREFIX}decisions",
            "Evaluations at policy points by last round asked, fraud label, scene and fraud type.",
            ["round", "label", "fraud_type", "scene"],
            registry=reg,
        )
        self.alerts = Counter(
            f"{PREFIX}alerts",
            "Fraud alerts raised (first fraud decision of a call) by fraud type.",
            ["fraud_type"],
            registry=reg,
        )
        self.calls_completed = Counter(
            f"{PREFIX}calls_completed",
            "Calls closed or expired, by verdict (fraud, normal, undecided).",
            ["verdict"],
            registry=reg,
        )
        self.time_to_detection = Histogram(
            f"{PREFIX}time_to_detection_seconds",
            "Seconds of call audio before the first fraud alert, observed for calls with a fraud verdict.",
            buckets=TIME_TO_DETECTION_BUCKETS,
            registry=reg,
        )
        self.active_calls = Gauge(f"{PREFIX}active_calls", "Calls open now.", registry=reg)
        self.generated_tokens = Counter(
            f"{PREFIX}generated_tokens", "Tokens generated by the engine.", registry=reg
        )
        self.model_calls = Counter(
            f"{PREFIX}model_calls", "Engine invocations, failed ones included.", registry=reg
        )
        self.engine_errors = Counter(
            f"{PREFIX}engine_errors",
            "Failed engine invocations by kind (timeout, error).",
            ["kind"],
            registry=reg,
        )
        self.rejected_requests = Counter(
            f"{PREFIX}rejected_requests", "Requests rejected by reason code.", ["reason"], registry=reg
        )
        self.chunks = Counter(f"{PREFIX}chunks", "Chunks accepted.", registry=reg)
        self.calls_expired = Counter(
            f"{PREFIX}calls_expired", "Calls closed by the server because they went idle.", registry=reg
        )
        self.store_errors = Counter(
            f"{PREFIX}store_errors",
            "Session store operations that failed, by kind (timeout, error); each answered 503 store_unavailable "
            "or made the server unready.",
            ["kind"],
            registry=reg,
        )
        self.cascade_escalations = Counter(
            f"{PREFIX}cascade_escalations",
            "Requests a confidence cascade sent to its large engine, by reason "
            "(low_confidence, no_confidence, unparsable).",
            ["reason"],
            registry=reg,
        )
        self.cascade_decisions = Counter(
            f"{PREFIX}cascade_decisions",
            "Requests a confidence cascade answered, by the engine whose answer was used (small, large).",
            ["answered_by"],
            registry=reg,
        )
        self.cascade_escalation_failures = Counter(
            f"{PREFIX}cascade_escalation_failures",
            "Escalated requests whose large-engine answer failed or timed out, by kind (timeout, error); "
            "the small engine's answer was used.",
            ["kind"],
            registry=reg,
        )
        # Closed label sets start at zero so that rate() sees the first increase and a ratio such as the fraud
        # rate is 0 rather than absent while no fraud verdict has been given yet.
        for verdict in Verdict:
            self.calls_completed.labels(verdict=verdict.value)
        for kind in EngineErrorKind:
            self.engine_errors.labels(kind=kind.value)
            self.store_errors.labels(kind=kind.value)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason=reason)
        for fraud_type in FRAUD_TYPE_VALUES:
            self.alerts.labels(fraud_type=fraud_type)
        for escalation in EscalationReason:
            self.cascade_escalations.labels(reason=escalation.value)
        for answered_by in AnsweredBy:
            self.cascade_decisions.labels(answered_by=answered_by.value)
        for kind in EngineErrorKind:
            self.cascade_escalation_failures.labels(kind=kind.value)

    def observe_chunk(self, seconds: float) -> None:
        """One accepted chunk and the time it took to handle."""
        self.chunks.inc()
        self.chunk_latency.observe(seconds)

    def observe_decision(
        self,
        seconds: float,
        *,
        round: Round | str | None,
        label: bool | str | None,
        scene: str | None = None,
        fraud_type: str | None = None,
    ) -> None:
        """One evaluation at a policy point: its latency and what it answered (None where it gave nothing)."""
        self.decision_latency.observe(seconds)
        self.decisions.labels(
            round=round_value(round),
            label=decision_label(label),
            fraud_type=fraud_type_value(fraud_type),
            scene=scene_value(scene),
        ).inc()

    def model_call(self, tokens: int = 0) -> None:
        """One engine invocation and the tokens it generated."""
        self.model_calls.inc()
        if tokens > 0:
            self.generated_tokens.inc(tokens)

    def engine_error(self, kind: EngineErrorKind | str) -> None:
        """A failed engine invocation (also counted by `model_call`); unknown kinds count as "error"."""
        value = str(kind)
        if value not in _ENGINE_ERROR_KINDS:
            value = EngineErrorKind.ERROR.value
        self.engine_errors.labels(kind=value).inc()

    def alert(self, fraud_type: str | None) -> None:
        """A call's first fraud alert; its fraud type is "none" when round 3 has not named one yet."""
        self.alerts.labels(fraud_type=fraud_type_value(fraud_type)).inc()

    def call_opened(self, *, active: bool = True) -> None:
        """A call opened; `active=False` where the gauge is set from a shared store instead (`carried_calls`)."""
        if active:
            self.active_calls.inc()

    def call_closed(
        self,
        verdict: Verdict | str,
        time_to_detection: float | None = None,
        *,
        expired: bool = False,
        active: bool = True,
    ) -> None:
        """A call ended with its verdict; `time_to_detection` is observed for fraud verdicts only."""
        value = Verdict(verdict)  # a verdict outside the three is a bug in the caller: fail loudly
        if active:
            self.active_calls.dec()
        self.calls_completed.labels(verdict=value.value).inc()
        if expired:
            self.calls_expired.inc()
        if value is Verdict.FRAUD and time_to_detection is not None:
            self.time_to_detection.observe(time_to_detection)

    def carried_calls(self, count: int) -> None:
        """With a shared store: the open calls this replica carries (whose last request it served), so that
        the sum over replicas is the number of open calls."""
        self.active_calls.set(count)

    def store_error(self, kind: EngineErrorKind | str) -> None:
        """A failed session store operation (unknown kinds count as "error")."""
        value = str(kind)
        if value not in _ENGINE_ERROR_KINDS:
            value = EngineErrorKind.ERROR.value
        self.store_errors.labels(kind=value).inc()

    def rejected(self, reason: str) -> None:
        self.rejected_requests.labels(reason=reject_reason(reason)).inc()

    def cascade_decision(self, answered_by: AnsweredBy | str) -> None:
        """One request answered by a cascade, by the engine whose answer was used."""
        self.cascade_decisions.labels(answered_by=AnsweredBy(answered_by).value).inc()

    def cascade_escalation(self, reason: EscalationReason | str) -> None:
        """One request sent to the cascade's large engine, and why."""
        self.cascade_escalations.labels(reason=EscalationReason(reason).value).inc()

    def cascade_escalation_failure(self, kind: EngineErrorKind | str) -> None:
        """One escalated request the large engine did not answer (unknown kinds count as "error")."""
        value = str(kind)
        if value not in _ENGINE_ERROR_KINDS:
            value = EngineErrorKind.ERROR.value
        self.cascade_escalation_failures.labels(kind=value).inc()

    def metrics(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
            self.chunk_latency,
            self.decision_latency,
            self.decisions,
            self.alerts,
            self.calls_completed,
            self.time_to_detection,
            self.active_calls,
            self.generated_tokens,
            self.model_calls,
            self.engine_errors,
            self.rejected_requests,
            self.chunks,
            self.calls_expired,
            self.store_errors,
            self.cascade_escalations,
            self.cascade_decisions,
            self.cascade_escalation_failures,
        )


@cache
def default_metrics() -> DetectorMetrics:
    """The process-wide metrics in prometheus_client's default registry (registering twice would fail)."""
    return DetectorMetrics()


# Sample names each metric type exposes in the text format, by the family's type.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def sample_names(metrics: Iterable[Counter | Gauge | Histogram]) -> frozenset[str]:
    """Every sample name the given metrics can expose, whether or not a labelled child exists yet."""
    names: set[str] = set()
    for metric in metrics:
        for family in metric.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def exported_sample_names() -> frozenset[str]:
    """The names of every sample family DetectorMetrics exports (built in a throwaway registry)."""
    return sample_names(DetectorMetrics(CollectorRegistry()).metrics())
