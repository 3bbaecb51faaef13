"""Live evaluation: held-out calls replayed through the real detector, and what it made of them.

`replay_calls` streams each call record through `teleguard.serve.detector.Detector` in process, the code that
`teleguard serve` runs (its `open` / `chunk` / `close`, the call session, the `DecisionPolicy`, any engine):
one chunk per finished turn, built by the stream client's own script builders
(`teleguard.serve.client.transcript_script`, turn times estimated with `teleguard.data.timing` where the source
has none; for a policy that asks for audio, the call's audio in 1 s chunks, `audio_script`), sent as fast as the
detector answers. Many calls are in flight at once (an asyncio semaphore), so an
engine's micro-batcher batches requests across calls as in serving. Each call's verdict and every decision are
kept as a `CallResult`.

`live_metrics` scores those results against the gold labels with TeleAntiFraud's definitions (fraud is the
positive class), adds detection timing, cost, latency, the calibration of the is_fraud confidences and a sweep
of the alert threshold; `live_figures` flattens it for KFP metrics and the quality gate; `live_blocks`,
`live_markdown` and `write_live_report` render it (model and baseline side by side,
`teleguard.evaluate.baseline`) with the report's own blocks (teleguard.evaluate.report).

Replaying with `monitoring_policy(policy)` (the same policy, `keep_monitoring_after_alert=True`) answers both
questions with one replay: the calls are evaluated at every policy point whatever the alerts, so the threshold
sweep is exact, and `as_deployed` cuts each call back to what the deployed policy (stopping after its first
alert) would have done, which is what the verdict, timing and cost figures are computed on. See
`threshold_sweep` for what a replay that stops after the first alert can and cannot say.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from teleguard.contract.labels import FRAUD, NORMAL, Round
from teleguard.data.records import CallLabels, CallRecord
from teleguard.engines.contract import EngineConfig, Generate
from teleguard.evaluate.metrics import UNKNOWN, classification_metrics
from teleguard.evaluate.report import _Block, _Heading, _html, _markdown, _num, _Paragraph, _Table
from teleguard.serve.client import (
    RATE,
    CallScript,
    audio_script,
    new_call_id,
    percentile,
    transcript_script,
)
from teleguard.serve.detector import Detector, DetectorConfig, Unavailable
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import Decision, RequestError

DEFAULT_CONCURRENCY = 16
DEFAULT_BINS = 10
# 0.00, 0.05, ..., 1.00: rounded, so that a threshold reads (and compares) as written
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(i * 0.05, 2) for i in range(21))
DEFAULT_MAX_FALSE_ALARM_RATE = 0.05
LIVE_TITLE = "Live evaluation: held-out calls through the detector"

ROUNDS: tuple[tuple[str, str], ...] = (
    ("fraud", "fraud (is_fraud)"),
    ("fraud_type", "fraud type"),
    ("scene", "scene"),
)


# --- what a replay records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveDecision:
    """One decision of the detector (one round's answer at one evaluation point)."""

    seq: int  # the chunk that triggered the evaluation
    round: str  # "scene", "is_fraud" or "fraud_type"
    label: str | bool | None  # this round's answer: canonical name, bool for is_fraud, None for null/invalid
    confidence: float | None  # what the policy's alert rule reads (the model's probability of the label)
    audio_time: float  # seconds of the call the model had seen
    latency_s: float  # the engine call behind it
    alert: bool = False
    stated_confidence: float | None = None  # the number the answer wrote, where the detector reports it
    conversation_stage: str | None = None
    insufficient: bool = False
    problems: tuple[str, ...] = ()

    @classmethod
    def of(cls, d: Decision) -> LiveDecision:
        return cls(
            seq=d.seq,
            round=Round(d.round).value,
            label=d.label,
            confidence=d.confidence,
            audio_time=d.audio_time,
            latency_s=d.latency_s,
            alert=d.alert,
            # the detector gains `stated_confidence` with token-probability confidences; older ones lack it
            stated_confidence=getattr(d, "stated_confidence", None),
            conversation_stage=None if d.conversation_stage is None else str(d.conversation_stage),
            insufficient=d.insufficient,
            problems=tuple(d.problems),
        )


@dataclass(frozen=True)
class CallResult:
    """One held-out call as the detector (or the baseline) handled it, with its gold labels."""

    call_id: str  # the record's id
    labels: CallLabels  # gold
    duration: float  # seconds of the call (the end of its last turn)
    turns: int
    is_fraud: bool  # the verdict: an alert was raised
    fraud_type: str | None  # the verdict's fraud type
    scene: str | None  # the verdict's scene
    first_alert_time: float | None  # seconds of the call at the first alert
    decisions: tuple[LiveDecision, ...]
    model_calls: int | None  # engine requests (None: no model, the baseline)
    evaluation_latencies: tuple[float, ...] = ()  # seconds per evaluation (a chunk or close that decided)
    alert_threshold: float = 0.5  # the policy's, in this replay
    monitored_after_alert: bool = False  # evaluated on after the first alert (keep_monitoring_after_alert)
    engine_errors: int = 0  # chunks or closes the engine failed on (the call went on)
    error: str | None = None  # the replay of this call broke off (a refused chunk); the verdict is partial

    @property
    def fraud_decisions(self) -> list[LiveDecision]:
        return [d for d in self.decisions if d.round == Round.FRAUD.value]

    @property
    def undecided(self) -> bool:
        """The model never answered is_fraud with true or false (the detector's "undecided" verdict)."""
        return not any(isinstance(d.label, bool) for d in self.fraud_decisions)

    @property
    def verdict_label(self) -> str:
        """The verdict in the is_fraud round's gold vocabulary: fraud, normal, or unknown (undecided)."""
        if self.is_fraud:
            return FRAUD
        return UNKNOWN if self.undecided else NORMAL

    @property
    def detection_fraction(self) -> float | None:
        """The share of the call heard before the first alert (None: no alert, or a call without length)."""
        if self.first_alert_time is None or self.duration <= 0:
            return None
        return min(1.0, self.first_alert_time / self.duration)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = self.labels.model_dump()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallResult:
        fields = dict(data)
        fields["labels"] = CallLabels.model_validate(fields["labels"])
        fields["decisions"] = tuple(
            LiveDecision(**{**d, "problems": tuple(d.get("problems", ()))}) for d in fields["decisions"]
        )
        fields["evaluation_latencies"] = tuple(fields.get("evaluation_latencies", ()))
        return cls(**fields)


def write_results(path: Path, results: Sequence[CallResult]) -> None:
    """One JSON object per call, so the live metrics can be recomputed without replaying."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


def read_results(path: Path) -> list[CallResult]:
    """What `write_results` wrote."""
    with Path(path).open(encoding="utf-8") as f:
        return [CallResult.from_dict(json.loads(line)) for line in f if line.strip()]


def as_deployed(result: CallResult) -> CallResult:
    """The call as the policy that stops after its first alert would have handled it.

    A replay with `keep_monitoring_after_alert` evaluates on after the first alert; everything before it is
    the same as without (the prompts do not depend on earlier answers or the threshold). Cut there: the
    decisions up to the first alert and the fraud-type round asked right after it, the verdict's fraud type
    from that round, the scene from the last scene answer so far, one engine request per decision kept.
    Results that already stopped, and calls without an alert, come back unchanged.
    """
    if not result.monitored_after_alert:
        return result
    first = next((i for i, d in enumerate(result.decisions) if d.alert), None)
    if first is None:
        return result
    alert = result.decisions[first]
    kept = list(result.decisions[: first + 1])
    after = result.decisions[first + 1] if first + 1 < len(result.decisions) else None
    fraud_type = None
    if after is not None and after.round == Round.FRAUD_TYPE.value and after.seq == alert.seq:
        kept.append(after)
        fraud_type = after.label if isinstance(after.label, str) else None
    scenes = [d.label for d in kept if d.round == Round.SCENE.value and isinstance(d.label, str)]
    evaluations = len({(d.seq, d.audio_time) for d in kept})
    return replace(
        result,
        fraud_type=fraud_type,
        scene=scenes[-1] if scenes else None,
        first_alert_time=alert.audio_time,
        decisions=tuple(kept),
        model_calls=None if result.model_calls is None else len(kept),
        evaluation_latencies=result.evaluation_latencies[:evaluations],
        monitored_after_alert=False,
    )


# --- the replay --------------------------------------------------------------------------------------------


def monitoring_policy(policy: DecisionPolicy) -> DecisionPolicy:
    """The same policy evaluating every point whatever the alerts: its replay makes the threshold sweep
    exact, and `as_deployed` recovers the deployed policy's verdicts from it."""
    return policy.model_copy(update={"keep_monitoring_after_alert": True})


def call_script(
    record: CallRecord, policy: DecisionPolicy, language: Literal["zh", "en"] | None = None
) -> CallScript:
    """What a client streams for a call: its audio in 1 s chunks when the policy asks for audio and the record
    has some (a model trained on audio), else one transcript chunk per finished turn."""
    if policy.modality == "audio" and record.audio:
        from teleguard.data.audio import read_audio

        audio, _ = read_audio(record.audio, rate=RATE)
        return audio_script(audio, source_id=record.call_id, labels=record.labels)
    return transcript_script(record, language=language)


async def _replay_one(
    detector: Detector, record: CallRecord, language: Literal["zh", "en"] | None
) -> CallResult:
    script = call_script(record, detector.policy, language)
    call_id = new_call_id(script)
    opened = await detector.open({"call_id": call_id, "modality": script.modality, "language": language})
    # the session holds every decision, also those of an evaluation the engine failed in part way (an alert
    # whose fraud-type round failed): the chunk's answer is then an error, not the decisions
    session = detector.registry.get(opened.call_id)
    latencies: list[float] = []
    engine_errors = 0
    error: str | None = None
    last_seq = -1
    for seq, planned in enumerate(script.chunks):
        start = time.perf_counter()
        try:
            # a dict, parsed by the detector as the server parses what a client sends
            result = await detector.chunk({"call_id": opened.call_id, "seq": seq, **planned.fields})
        except Unavailable:
            engine_errors += 1  # the chunk is accepted; the next chunk or the close evaluates its content
            last_seq = seq
            continue
        except RequestError as err:  # refused: not accepted, so nothing after it can be sent either
            error = f"chunk {seq}: {err.reason}: {err.message}"
            break
        last_seq = seq
        if result.decisions:
            latencies.append(time.perf_counter() - start)
    verdict = None
    for _ in range(2):  # a failed close can be retried as is
        start = time.perf_counter()
        try:
            closed = await detector.close({"call_id": opened.call_id, "last_seq": last_seq})
        except Unavailable:
            engine_errors += 1
            continue
        if closed.decisions:
            latencies.append(time.perf_counter() - start)
        verdict = closed.verdict
        break
    if verdict is None:  # the engine failed twice on the close: the verdict of the decisions so far
        verdict = detector.policy.verdict(session)
        error = error or "the close failed twice; verdict from the decisions before it"
    return CallResult(
        call_id=record.call_id,
        labels=record.labels,
        duration=script.duration,
        turns=len(record.turns),
        is_fraud=verdict.is_fraud,
        fraud_type=verdict.fraud_type,
        scene=verdict.scene,
        first_alert_time=verdict.first_alert_time,
        decisions=tuple(LiveDecision.of(d) for d in session.decisions),
        model_calls=verdict.model_calls,
        evaluation_latencies=tuple(latencies),
        alert_threshold=detector.policy.alert_threshold,
        monitored_after_alert=detector.policy.keep_monitoring_after_alert,
        engine_errors=engine_errors,
        error=error,
    )


class ReplayOptions(TypedDict, total=False):
    """How calls are replayed, the same for every replay function (defaults in `replay_calls_async`)."""

    concurrency: int  # calls in flight at once
    detector_config: DetectorConfig | None  # the detector's limits (its session limits bound the transcript)
    language: Literal["zh", "en"] | None  # overrides the policy's prompt language per call


async def replay_calls_async(
    calls: Sequence[CallRecord],
    generate: Generate,
    policy: DecisionPolicy,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    detector_config: DetectorConfig | None = None,
    language: Literal["zh", "en"] | None = None,
) -> list[CallResult]:
    """`replay_calls` on the running event loop."""
    from prometheus_client import CollectorRegistry

    from teleguard.serve.metrics import DetectorMetrics

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    config = detector_config or DetectorConfig()
    if config.max_calls < concurrency:
        raise ValueError(f"detector max_calls ({config.max_calls}) is below the concurrency ({concurrency})")
    for record in calls:
        if not record.turns:
            raise ValueError(f"call {record.call_id} has no transcript: the live replay streams transcripts")
    # its own registry: a replay's counters must not mix with a server's in this process
    detector = Detector(generate, policy=policy, config=config, metrics=DetectorMetrics(CollectorRegistry()))
    gate = asyncio.Semaphore(concurrency)

    async def one(record: CallRecord) -> CallResult:
        async with gate:
            return await _replay_one(detector, record, language)

    # the engine is the caller's: not closed here (Detector.aclose would close it)
    return list(await asyncio.gather(*(one(r) for r in calls)))


def replay_calls(
    calls: Sequence[CallRecord], generate: Generate, policy: DecisionPolicy, **options: Unpack[ReplayOptions]
) -> list[CallResult]:
    """Replay each call through the real detector with `generate` as its engine; one result per call, in order.

    `generate` is any `teleguard.engines.contract.Generate` (for a model:
    `teleguard.engines.factory.build_engine`; it is not closed here). Each call is opened with its script's
    modality (`call_script`) and streamed as fast as the detector answers, at most `concurrency` calls at a time
    (`ReplayOptions`). An engine failure on a chunk is counted (`engine_errors`) and the call goes on, as a
    client's retry would; a refused chunk ends that call's replay (`error`). Runs its own event loop: from
    async code use `replay_calls_async`.
    """
    return asyncio.run(replay_calls_async(calls, generate, policy, **options))


def replay_model(
    calls: Sequence[CallRecord],
    engine_config: EngineConfig,
    policy: DecisionPolicy,
    **options: Unpack[ReplayOptions],
) -> list[CallResult]:
    """`replay_calls` with the serving engine `engine_config` names (`teleguard.engines.factory.build_engine`, as
    `teleguard serve` builds it: transformers with its micro-batcher, vLLM, remote), closed afterwards."""
    from teleguard.engines.factory import build_engine
    from teleguard.engines.wrappers import close_engine

    engine = build_engine(engine_config)  # loads the model: before the event loop, as the server does

    async def run() -> list[CallResult]:
        try:
            return await replay_calls_async(calls, engine, policy, **options)
        finally:
            await close_engine(engine)

    return asyncio.run(run())


# --- metrics -------------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def reliability(
    confidences: Sequence[float], correct: Sequence[bool], *, bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """A reliability table and the expected calibration error.

    Bins split [0, 1] into `bins` equal intervals, [k/bins, (k+1)/bins), the last one closed; each holds
    "count", "mean_confidence" and "accuracy" (share correct), None for both when empty. ECE = sum over bins
    of count/n * |accuracy - mean confidence| (None for no decisions).
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidences):
        # the small epsilon keeps 0.3 in [0.3, 0.4) although 0.3 * 10 may come out as 2.9999...
        members[min(bins - 1, max(0, math.floor(c * bins + 1e-9)))].append(i)
    table = []
    ece = 0.0
    n = len(confidences)
    for k, idx in enumerate(members):
        mean_conf = _mean([confidences[i] for i in idx])
        accuracy = _mean([float(correct[i]) for i in idx])
        if idx:
            ece += len(idx) / n * abs(accuracy - mean_conf)  # type: ignore[operator]
        table.append(
            {
                "low": round(k / bins, 6),
                "high": round((k + 1) / bins, 6),
                "count": len(idx),
                "mean_confidence": mean_conf,
                "accuracy": accuracy,
            }
        )
    return {"n": n, "ece": ece if n else None, "bins": table}


def _calibration(results: Sequence[CallResult], attr: str, bins: int) -> dict[str, Any]:
    """Reliability of the is_fraud decisions' `attr` (confidence or stated_confidence): a decision is correct
    when its true/false answer is the call's gold label; null answers and missing confidences are left out."""
    confidences: list[float] = []
    correct: list[bool] = []
    left_out = 0
    for r in results:
        for d in r.fraud_decisions:
            value = getattr(d, attr)
            if not isinstance(d.label, bool) or value is None:
                left_out += 1
                continue
            confidences.append(float(value))
            correct.append(d.label == r.labels.is_fraud)
    return {**reliability(confidences, correct, bins=bins), "left_out": left_out}


def _fires(d: LiveDecision, threshold: float) -> bool:
    # the policy's alert rule; a missing confidence counts as 0
    return d.label is True and (d.confidence or 0.0) >= threshold


def threshold_sweep(
    results: Sequence[CallResult], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[dict[str, Any]]:
    """Recall and false-alarm rate had the alert fired at each threshold, from each call's is_fraud decisions.

    A call is flagged at threshold t when one of its is_fraud decisions says true with confidence >= t (the
    policy's rule). Per threshold: "threshold", "recall" (flagged fraud calls / fraud calls),
    "false_alarm_rate" (flagged normal calls / normal calls), "precision", "flagged_within_half" (fraud calls
    flagged within the first half of the call / fraud calls), "inexact_calls" and "exact"; precision is
    None where nothing is flagged.

    Which thresholds are exact: the decisions before a call's first alert do not depend on the threshold (the
    prompts carry no earlier answer), so a replay at threshold T that stops after the first alert is exact for
    every t <= T: the first decision that fires at t comes at or before the one that stopped the call. For
    t > T it is exact only for calls that never alerted, or whose stopping decision's confidence is >= t;
    for the others ("inexact_calls") the detector would have gone on listening, and the figures are lower
    bounds. A replay with `keep_monitoring_after_alert` (`monitoring_policy`) saw every point and is exact
    at every threshold (up to the per-call model-call budget, which its fraud-type rounds use earlier).
    """
    fraud = [r for r in results if r.labels.is_fraud]
    normal = [r for r in results if not r.labels.is_fraud]
    points = []
    for t in thresholds:
        flagged: dict[str, float | None] = {}  # call id -> detection fraction at its first firing decision
        inexact = 0
        for r in results:
            hit = next((d for d in r.fraud_decisions if _fires(d, t)), None)
            if hit is not None:
                flagged[r.call_id] = hit.audio_time / r.duration if r.duration > 0 else None
            elif not r.monitored_after_alert and t > r.alert_threshold and any(d.alert for d in r.decisions):
                inexact += 1
        tp = sum(r.call_id in flagged for r in fraud)
        fp = sum(r.call_id in flagged for r in normal)
        half = sum(
            r.call_id in flagged and (flagged[r.call_id] is not None and flagged[r.call_id] <= 0.5)  # type: ignore[operator]
            for r in fraud
        )
        points.append(
            {
                "threshold": t,
                "recall": _ratio(tp, len(fraud)),
                "false_alarm_rate": _ratio(fp, len(normal)),
                "precision": tp / (tp + fp) if tp + fp else None,  # nothing flagged: undefined
                "flagged_within_half": _ratio(half, len(fraud)),
                "inexact_calls": inexact,
                "exact": inexact == 0,
            }
        )
    return points


def pick_threshold(
    sweep: Sequence[Mapping[str, Any]],
    *,
    max_false_alarm_rate: float = DEFAULT_MAX_FALSE_ALARM_RATE,
    exact_only: bool = True,
) -> dict[str, Any] | None:
    """The operating point: the highest recall with false alarms <= `max_false_alarm_rate`; among equal
    recalls the fewest false alarms, then the highest threshold (fewest alerts to act on). None when no
    (exact, with `exact_only`) point meets the target."""
    ok = [
        p for p in sweep if p["false_alarm_rate"] <= max_false_alarm_rate and (p["exact"] or not exact_only)
    ]
    if not ok:
        return None
    return dict(max(ok, key=lambda p: (p["recall"], -p["false_alarm_rate"], p["threshold"])))


def live_metrics(
    results: Sequence[CallResult],
    *,
    bins: int = DEFAULT_BINS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_false_alarm_rate: float = DEFAULT_MAX_FALSE_ALARM_RATE,
) -> dict[str, Any]:
    """Live figures of replayed calls against their gold labels.

    Verdict, timing and cost figures are over each call `as_deployed` (what the policy that stops after its
    first alert did); calibration and the sweep over every decision the replay made. Keys:

    - "n_calls", "n_fraud_calls", "n_normal_calls", "alert_threshold", "monitored_after_alert";
    - "fraud", "fraud_type", "scene": `classification_metrics` (TeleAntiFraud's: accuracy = micro F1, macro F1
      over every gold and predicted label) of the verdicts: fraud/normal over all calls (an undecided call
      is "unknown"), the verdict's fraud type over the fraud calls and its scene over the calls with a gold
      scene ("unknown" where the verdict has none);
    - "verdict_accuracy", "precision", "recall", "f1" (of the fraud class), "macro_f1" (fraud/normal);
      "false_alarm_rate": normal calls flagged / normal calls; "fraud_type_accuracy", "scene_accuracy";
    - "time_to_detection_s" and "detection_fraction" ({mean, median, n}): seconds of the call, and the share of
      the call, before the first alert of each correctly flagged fraud call (null when none);
      "flagged_within_quarter" / "flagged_within_half": fraud calls whose first alert came within the first
      25 % / 50 % of the call, over all fraud calls;
    - "evaluations_per_call", "decisions_per_call", "model_calls_per_call" (means; model calls null without
      a model); "latency_s": {p50, p99, n} of the evaluations (a chunk or close that led to decisions, as
      the detector's client sees it, queueing in the engine's batcher included);
    - "undecided_calls", "undecided_rate", "malformed_rate" (decisions with a problem read from the answer),
      "engine_errors", "failed_calls" (replays broken off);
    - "calibration" (`reliability` of the is_fraud decisions' confidence, with "left_out") and, when the
      detector reports it, "calibration_stated" (the same for the stated number);
    - "threshold_sweep" (`threshold_sweep`) and "operating_point" (`pick_threshold` at
      `max_false_alarm_rate`, or null), "max_false_alarm_rate".
    """
    deployed = [as_deployed(r) for r in results]
    fraud = [r for r in deployed if r.labels.is_fraud]
    normal = [r for r in deployed if not r.labels.is_fraud]
    with_scene = [r for r in deployed if r.labels.scene is not None]

    verdicts = classification_metrics(
        [FRAUD if r.labels.is_fraud else NORMAL for r in deployed], [r.verdict_label for r in deployed]
    )
    types = classification_metrics(
        [r.labels.fraud_type or UNKNOWN for r in fraud], [r.fraud_type or UNKNOWN for r in fraud]
    )
    scenes = classification_metrics(
        [r.labels.scene for r in with_scene],  # type: ignore[misc]
        [r.scene or UNKNOWN for r in with_scene],
    )
    fraud_class = verdicts["per_class"].get(FRAUD, {"precision": 0.0, "recall": 0.0, "f1": 0.0})

    detected = [r for r in fraud if r.is_fraud]
    seconds = [r.first_alert_time for r in detected if r.first_alert_time is not None]
    fractions = [f for f in (r.detection_fraction for r in detected) if f is not None]

    def within(share: float) -> float:
        return _ratio(sum(f <= share for f in fractions), len(fraud))

    latencies = [s for r in deployed for s in r.evaluation_latencies]
    all_decisions = [d for r in deployed for d in r.decisions]
    with_model = [r.model_calls for r in deployed if r.model_calls is not None]
    thresholds_used = sorted({r.alert_threshold for r in results})
    sweep = threshold_sweep(results, thresholds)
    out: dict[str, Any] = {
        "n_calls": len(deployed),
        "n_fraud_calls": len(fraud),
        "n_normal_calls": len(normal),
        # one threshold per replay; a mix of replays lists theirs
        "alert_threshold": thresholds_used[0] if len(thresholds_used) == 1 else (thresholds_used or None),
        "monitored_after_alert": any(r.monitored_after_alert for r in results),
        "fraud": verdicts,
        "fraud_type": types,
        "scene": scenes,
        "verdict_accuracy": verdicts["accuracy"],
        "precision": fraud_class["precision"],
        "recall": fraud_class["recall"],
        "f1": fraud_class["f1"],
        "macro_f1": verdicts["macro_f1"],
        "false_alarm_rate": _ratio(sum(r.is_fraud for r in normal), len(normal)),
        "fraud_type_accuracy": types["accuracy"] if fraud else None,
        "scene_accuracy": scenes["accuracy"] if with_scene else None,
        "time_to_detection_s": {"mean": _mean(seconds), "median": _median(seconds), "n": len(seconds)},
        "detection_fraction": {"mean": _mean(fractions), "median": _median(fractions), "n": len(fractions)},
        "flagged_within_quarter": within(0.25),
        "flagged_within_half": within(0.5),
        "evaluations_per_call": _ratio(sum(len(r.fraud_decisions) for r in deployed), len(deployed)),
        "decisions_per_call": _ratio(len(all_decisions), len(deployed)),
        "model_calls_per_call": _ratio(sum(with_model), len(with_model)) if with_model else None,
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "n": len(latencies),
        },
        "undecided_calls": sum(r.undecided for r in deployed),
        "undecided_rate": _ratio(sum(r.undecided for r in deployed), len(deployed)),
        "malformed_rate": _ratio(sum(bool(d.problems) for d in all_decisions), len(all_decisions)),
        "engine_errors": sum(r.engine_errors for r in results),
        "failed_calls": sum(r.error is not None for r in results),
        "calibration": _calibration(results, "confidence", bins),
        "threshold_sweep": sweep,
        "max_false_alarm_rate": max_false_alarm_rate,
        "operating_point": pick_threshold(sweep, max_false_alarm_rate=max_false_alarm_rate),
    }
    if any(d.stated_confidence is not None for r in results for d in r.decisions):
        out["calibration_stated"] = _calibration(results, "stated_confidence", bins)
    return out


# --- flat figures --------------------------------------------------------------------------------------------

# figure name (after the prefix) -> path into live_metrics' result
FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("calls", ("n_calls",)),
    ("verdict_accuracy", ("verdict_accuracy",)),
    ("precision", ("precision",)),
    ("recall", ("recall",)),
    ("f1", ("f1",)),
    ("macro_f1", ("macro_f1",)),
    ("false_alarm_rate", ("false_alarm_rate",)),
    ("fraud_type_accuracy", ("fraud_type_accuracy",)),
    ("fraud_type_macro_f1", ("fraud_type", "macro_f1")),
    ("scene_accuracy", ("scene_accuracy",)),
    ("scene_macro_f1", ("scene", "macro_f1")),
    ("time_to_detection_s_mean", ("time_to_detection_s", "mean")),
    ("time_to_detection_s_median", ("time_to_detection_s", "median")),
    ("detection_fraction_mean", ("detection_fraction", "mean")),
    ("detection_fraction_median", ("detection_fraction", "median")),
    ("flagged_within_quarter", ("flagged_within_quarter",)),
    ("flagged_within_half", ("flagged_within_half",)),
    ("evaluations_per_call", ("evaluations_per_call",)),
    ("decisions_per_call", ("decisions_per_call",)),
    ("model_calls_per_call", ("model_calls_per_call",)),
    ("latency_p50_s", ("latency_s", "p50")),
    ("latency_p99_s", ("latency_s", "p99")),
    ("undecided_calls", ("undecided_calls",)),
    ("undecided_rate", ("undecided_rate",)),
    ("malformed_rate", ("malformed_rate",)),
    ("engine_errors", ("engine_errors",)),
    ("ece", ("calibration", "ece")),
    ("stated_ece", ("calibration_stated", "ece")),
    ("operating_threshold", ("operating_point", "threshold")),
    ("operating_recall", ("operating_point", "recall")),
    ("operating_false_alarm_rate", ("operating_point", "false_alarm_rate")),
)


def _dig(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def live_figures(metrics: Mapping[str, Any], prefix: str = "live_") -> dict[str, float]:
    """`live_metrics`' headline figures as one flat {name: float} dict (KFP metrics, the quality gate):
    `live_verdict_accuracy`, `live_false_alarm_rate`, `live_fraud_type_accuracy`, `live_flagged_within_half`,
    ... (the names of `FIGURES` after `prefix`). Figures without a value (no fraud call detected, no model
    calls, no operating point) are left out rather than written as 0."""
    out = {}
    for name, path in FIGURES:
        value = _dig(metrics, path)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[prefix + name] = float(value)
    return out


# --- the report ----------------------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _row(
    label: str, models: Mapping[str, Mapping[str, Any]], path: Sequence[str], fmt: Any = _num
) -> list[str]:
    return [label, *(fmt(_dig(m, path)) for m in models.values())]


def live_blocks(
    models: Mapping[str, Mapping[str, Any]],
    *,
    baseline_offline: Mapping[str, Any] | None = None,
    level: int = 2,
    heading: bool = True,
) -> list[_Block]:
    """The live section as report blocks (teleguard.evaluate.report): `models` maps a column name (the model,
    the baseline) to its `live_metrics`; `baseline_offline` is `teleguard.evaluate.baseline.score_offline`'s
    result. The section's heading is at `level` and its tables' one below (without `heading`: tables at
    `level`, for a document of its own)."""
    names = list(models)
    headers = ["figure", *names]
    sub = level + 1 if heading else level
    blocks: list[_Block] = [
        *([_Heading("Live evaluation (held-out calls through the detector)", level)] if heading else []),
        _Paragraph(
            "Each held-out call is streamed turn by turn through the detector `teleguard serve` runs (session, "
            "decision policy, engine); the verdict is fraud when an alert was raised. Fraud is the positive "
            "class; an undecided call (the model never answered is_fraud) counts as unknown. "
            "Columns: " + ", ".join(names) + "."
        ),
        _Heading("Verdicts by round", sub),
    ]
    rows = [
        _row("calls", models, ("n_calls",)),
        ["fraud / normal calls", *(f"{m['n_fraud_calls']} / {m['n_normal_calls']}" for m in models.values())],
    ]
    for key, title in ROUNDS:
        rows.append(_row(f"{title}: n", models, (key, "n_samples")))
        rows.append(_row(f"{title}: accuracy", models, (key, "accuracy")))
        rows.append(_row(f"{title}: macro F1", models, (key, "macro_f1")))
    rows += [
        _row("fraud: precision", models, ("precision",)),
        _row("fraud: recall", models, ("recall",)),
        _row("fraud: F1", models, ("f1",)),
        _row("false-alarm rate (normal calls flagged)", models, ("false_alarm_rate",)),
        _row("undecided calls", models, ("undecided_calls",)),
    ]
    blocks.append(_Table(headers, rows))

    blocks += [
        _Heading("Time to detection", sub),
        _Paragraph(
            "Seconds of the call, and the share of the call, before the first alert of each correctly flagged "
            "fraud call; the flagged shares are over all fraud calls."
        ),
        _Table(
            headers,
            [
                _row("detected fraud calls", models, ("time_to_detection_s", "n")),
                _row(
                    "time to detection: mean (s)",
                    models,
                    ("time_to_detection_s", "mean"),
                    lambda v: _num(v, 1),
                ),
                _row(
                    "time to detection: median (s)",
                    models,
                    ("time_to_detection_s", "median"),
                    lambda v: _num(v, 1),
                ),
                _row("share of the call: mean", models, ("detection_fraction", "mean")),
                _row("share of the call: median", models, ("detection_fraction", "median")),
                _row("flagged within the first 25 %", models, ("flagged_within_quarter",), _pct),
                _row("flagged within the first 50 %", models, ("flagged_within_half",), _pct),
            ],
        ),
        _Heading("Cost and latency", sub),
        _Paragraph(
            "Evaluation latency: the wall time of each chunk (or close) that led to decisions, as the detector's "
            "caller sees it, waiting in the engine's batcher included; for the baseline, its batch "
            "classification time per point. One model call is one engine request (one round's answer)."
        ),
        _Table(
            headers,
            [
                _row(
                    "alert threshold",
                    models,
                    ("alert_threshold",),
                    lambda v: _num(v, 2) if not isinstance(v, list) else str(v),
                ),
                _row("evaluations per call", models, ("evaluations_per_call",), lambda v: _num(v, 2)),
                _row("decisions per call", models, ("decisions_per_call",), lambda v: _num(v, 2)),
                _row("model calls per call", models, ("model_calls_per_call",), lambda v: _num(v, 2)),
                _row("evaluation latency p50 (s)", models, ("latency_s", "p50")),
                _row("evaluation latency p99 (s)", models, ("latency_s", "p99")),
                _row("malformed answers", models, ("malformed_rate",), _pct),
                _row("engine errors", models, ("engine_errors",)),
                _row("replays broken off", models, ("failed_calls",)),
            ],
        ),
    ]

    if baseline_offline:
        rows = [
            [title, _num(m["n_samples"]), _num(m["accuracy"]), _num(m["weighted_f1"]), _num(m["macro_f1"])]
            for key, title in ROUNDS
            if (m := baseline_offline.get(key))
        ]
        blocks += [
            _Heading("Baseline offline (whole calls)", sub),
            _Paragraph(
                str(baseline_offline.get("description", "TF-IDF + logistic regression, whole calls."))
            ),
            _Table(["round", "n", "accuracy", "weighted F1", "macro F1"], rows),
        ]

    for name, m in models.items():
        tables = [("confidence", m.get("calibration"))]
        if m.get("calibration_stated"):
            tables.append(("stated confidence", m["calibration_stated"]))
        for what, cal in tables:
            if not cal or not cal["n"]:
                continue
            blocks += [
                _Heading(f"{name}: calibration of the is_fraud {what}", sub),
                _Paragraph(
                    f"{cal['n']} is_fraud decisions ({cal['left_out']} null or without a confidence left out); "
                    f"a decision is correct when its answer is the call's label. ECE {_num(cal['ece'])}."
                ),
                _Table(
                    ["confidence", "decisions", "mean confidence", "accuracy"],
                    [
                        [
                            f"{b['low']:.1f}-{b['high']:.1f}",
                            str(b["count"]),
                            _num(b["mean_confidence"]),
                            _num(b["accuracy"]),
                        ]
                        for b in cal["bins"]
                    ],
                ),
            ]
        sweep = m.get("threshold_sweep") or []
        if sweep:
            point = m.get("operating_point")
            choice = (
                f"Operating point (highest recall with false alarms <= {_pct(m['max_false_alarm_rate'])}): "
                f"threshold {point['threshold']:.2f}, recall {_num(point['recall'])}, false alarms "
                f"{_num(point['false_alarm_rate'])}."
                if point
                else f"No exact threshold keeps false alarms <= {_pct(m.get('max_false_alarm_rate'))}."
            )
            blocks += [
                _Heading(f"{name}: alert threshold sweep", sub),
                _Paragraph(
                    "Had the alert fired at each threshold (is_fraud true with confidence >= it). Inexact rows "
                    "(the replay stopped at an alert below the threshold) are lower bounds. " + choice
                ),
                _Table(
                    ["threshold", "recall", "false-alarm rate", "precision", "flagged within 50 %", "exact"],
                    [
                        [
                            f"{p['threshold']:.2f}",
                            _num(p["recall"]),
                            _num(p["false_alarm_rate"]),
                            _num(p["precision"]),
                            _num(p["flagged_within_half"]),
                            "yes" if p["exact"] else f"no ({p['inexact_calls']} calls)",
                        ]
                        for p in sweep
                    ],
                ),
            ]
    return blocks


def live_markdown(
    models: Mapping[str, Mapping[str, Any]],
    *,
    baseline_offline: Mapping[str, Any] | None = None,
    title: str = LIVE_TITLE,
) -> str:
    """The live section as a Markdown document (see `live_blocks`)."""
    blocks = live_blocks(models, baseline_offline=baseline_offline, heading=False)
    return _markdown(title, blocks, None, Path("."))


def write_live_report(
    models: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    *,
    baseline_offline: Mapping[str, Any] | None = None,
    title: str = LIVE_TITLE,
) -> dict[str, Path]:
    """live.json (every model's `live_metrics` and the baseline's offline result), live.md and live.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = live_blocks(models, baseline_offline=baseline_offline, heading=False)
    paths = {"json": out / "live.json", "markdown": out / "live.md", "html": out / "live.html"}
    data = {"models": dict(models), "baseline_offline": baseline_offline}
    paths["json"].write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(_markdown(title, blocks, None, out), encoding="utf-8")
    paths["html"].write_text(_html(title, blocks, None), encoding="utf-8")
    return paths


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FIGURES",
    "CallResult",
    "LiveDecision",
    "ReplayOptions",
    "as_deployed",
    "live_blocks",
    "live_figures",
    "live_markdown",
    "live_metrics",
    "monitoring_policy",
    "pick_threshold",
    "read_results",
    "reliability",
    "replay_calls",
    "replay_calls_async",
    "replay_model",
    "threshold_sweep",
    "write_live_report",
    "write_results",
]
