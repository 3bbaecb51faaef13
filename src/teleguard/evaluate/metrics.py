"""Evaluation metrics for the three rounds and for real-time (prefix) detection: pure functions, no model.

Every model output is read through the one parser (`teleguard.contract.parse_output`), so evaluation scores
exactly what the rewards and the server see.

Classification follows TeleAntiFraud's official evaluation: the label set is every gold *and* every predicted
label (an output that names no valid label counts as the label "unknown"), accuracy equals micro F1, and
macro F1 averages over that whole label set, so a label that is only ever predicted pulls macro F1 down.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from teleguard.contract.confidence import ConfidenceSource
from teleguard.contract.labels import FRAUD, NORMAL, STAGES, Round, Stage
from teleguard.contract.parser import ParsedOutput, parse_output

UNKNOWN = "unknown"  # the predicted label of an output that names no valid label

# The result key of each round: the is_fraud round reports as "fraud".
TASK_KEYS: dict[Round, str] = {Round.SCENE: "scene", Round.FRAUD: "fraud", Round.FRAUD_TYPE: "fraud_type"}


@dataclass(frozen=True)
class RoundPrediction:
    """One model output for one round of one call (stage "complete") or of one of its prefixes."""

    call_id: str  # the whole call's id, shared by its prefixes
    task: str  # the round: "scene", "is_fraud" or "fraud_type"
    gold: str  # a scene name, "fraud"/"normal", or a fraud-type name
    output: str  # the model's raw output
    stage: str = "complete"  # the gold conversation stage of the prompt's call or prefix
    audio_length: float = 0.0  # seconds of call audio in the prompt
    audio_idx: int = 0  # turns of the call in the prompt
    # The model's probability of the output's label (teleguard.contract.confidence, the detector's confidence;
    # `teleguard.engines.Completion.confidence`); None: not measured, or the output has no label span.
    confidence: float | None = None
    # "tokens": the engine reported the output's token logprobs, so `confidence` is the measured one (None: no
    # label span, read as missing, as the server does); "stated" or None (not recorded): a None `confidence`
    # means not measured and the output's stated number stands in (`prediction_confidence`).
    confidence_source: ConfidenceSource | None = None


def _measured(p: RoundPrediction) -> bool:
    return p.confidence is not None or p.confidence_source == "tokens"


def _stated(parsed: ParsedOutput) -> float | None:
    # as teleguard.contract.confidence.read_confidence: a stated number outside [0, 1] is missing
    stated = parsed.confidence
    return stated if stated is not None and 0 <= stated <= 1 else None


def prediction_confidence(
    p: RoundPrediction, parsed: ParsedOutput | None = None
) -> tuple[float | None, ConfidenceSource]:
    """The confidence a prediction's decisions use, and where it came from, as the server reads it.

    The token confidence (`p.confidence`, source "tokens") when it was measured: `p.confidence` is a number,
    or `p.confidence_source` is "tokens" (measured, no label span: None, which alerts count as 0 and the
    cascade escalates as no_confidence). Otherwise the number the output states, in [0, 1] (source "stated";
    None when it states none), what the server falls back to for an engine without log-probabilities.
    `parsed` is `p.output` already parsed for its round (parsed here when not given).
    """
    if _measured(p):
        return p.confidence, "tokens"
    if parsed is None:
        parsed = parse_output(p.output, round=Round(p.task))
    return _stated(parsed), "stated"


def confidence_sources(preds: Sequence[RoundPrediction]) -> dict[str, int]:
    """How many predictions' confidence is the token one and how many the stated one: {"tokens", "stated"}."""
    counts = dict.fromkeys(("tokens", "stated"), 0)
    for p in preds:
        counts["tokens" if _measured(p) else "stated"] += 1
    return counts


def _label_of(parsed: ParsedOutput, round_: Round) -> str:
    value = parsed.canonical_label
    if round_ is Round.FRAUD:
        if isinstance(value, bool):
            return FRAUD if value else NORMAL
        return UNKNOWN
    return value if isinstance(value, str) else UNKNOWN


def predicted_label(p: RoundPrediction) -> str:
    """The label an output predicts, in the vocabulary of the gold answers.

    is_fraud: "fraud" / "normal" for a JSON boolean, else "unknown" (null, a string, no answer). scene and
    fraud_type: the canonical (Chinese) label, English names and aliases accepted, else "unknown".
    """
    round_ = Round(p.task)
    return _label_of(parse_output(p.output, round=round_), round_)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """TeleAntiFraud's official classification metrics.

    - labels: sorted(set(y_true) | set(y_pred)): "unknown" predictions and never-gold labels are classes;
    - accuracy = micro F1 = correct / total;
    - per class: precision = tp / predicted, recall = tp / support, F1 their harmonic mean (each 0 when its
      denominator is 0), support = gold count;
    - weighted F1 = sum(F1 * support) / total; macro F1 = mean of per-class F1 over all labels;
    - confusion matrix: rows are gold labels, columns predicted labels, both in `labels` order.

    Empty input gives zeros and empty tables.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold labels but {len(y_pred)} predictions")
    total = len(y_true)
    labels = sorted(set(y_true) | set(y_pred))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for gold, pred in zip(y_true, y_pred, strict=True):
        matrix[index[gold]][index[pred]] += 1

    per_class: dict[str, dict[str, float | int]] = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}

    accuracy = _ratio(sum(matrix[i][i] for i in range(len(labels))), total)
    return {
        "n_samples": total,
        "accuracy": accuracy,
        "micro_f1": accuracy,  # every sample is in the label set, so micro P = micro R = accuracy
        "weighted_f1": _ratio(sum(c["f1"] * c["support"] for c in per_class.values()), total),
        "macro_f1": _ratio(sum(c["f1"] for c in per_class.values()), len(labels)),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": matrix},
        "gold_distribution": dict(sorted(Counter(y_true).items())),
        "pred_distribution": dict(sorted(Counter(y_pred).items())),
    }


def _format_stats(parsed: Sequence[ParsedOutput]) -> dict[str, Any]:
    return {
        "n_outputs": len(parsed),
        "well_formed_rate": _ratio(sum(o.well_formed for o in parsed), len(parsed)),
        "mean_think_length": _ratio(sum(o.think_length for o in parsed), len(parsed)),
    }


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    # None (JSON null), not 0, when nothing was detected: 0 s would read as an instant detection.
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def _realtime(rows: Sequence[tuple[RoundPrediction, ParsedOutput]], alert_threshold: float) -> dict[str, Any]:
    gold_of_call: dict[str, str] = {}
    for p, _ in rows:
        if gold_of_call.setdefault(p.call_id, p.gold) != p.gold:
            raise ValueError(f"call {p.call_id}: its is_fraud rows disagree on the gold label")

    def flagged(p: RoundPrediction, o: ParsedOutput) -> bool:
        # The server's rule (teleguard.serve.policy): the token confidence, else the stated one; a missing
        # confidence counts as 0, so it raises an alert only when the threshold is 0.
        confidence, _ = prediction_confidence(p, o)
        return o.canonical_label is True and (confidence or 0.0) >= alert_threshold

    seconds: dict[str, float] = {}  # fraud call -> audio seconds at its first alert
    turns: dict[str, int] = {}  # fraud call -> turns at its first alert
    early: set[str] = set()
    false_alarms: set[str] = set()
    for p, o in rows:
        if not flagged(p, o):
            continue
        if p.gold == FRAUD:
            seconds[p.call_id] = min(seconds.get(p.call_id, p.audio_length), p.audio_length)
            turns[p.call_id] = min(turns.get(p.call_id, p.audio_idx), p.audio_idx)
            if p.stage != Stage.COMPLETE:
                early.add(p.call_id)
        elif p.gold == NORMAL:
            false_alarms.add(p.call_id)

    fraud_calls = [c for c, g in gold_of_call.items() if g == FRAUD]
    normal_calls = [c for c, g in gold_of_call.items() if g == NORMAL]
    by_stage: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        staged = [(p, o) for p, o in rows if p.stage == stage]
        if staged:
            correct = sum(_label_of(o, Round.FRAUD) == p.gold for p, o in staged)
            by_stage[stage] = {"n_rows": len(staged), "accuracy": _ratio(correct, len(staged))}
    return {
        "alert_threshold": alert_threshold,
        "confidence_source": confidence_sources([p for p, _ in rows]),
        "n_rows": len(rows),
        "n_fraud_calls": len(fraud_calls),
        "n_normal_calls": len(normal_calls),
        "stage_accuracy": _ratio(sum(o.conversation_stage == p.stage for p, o in rows), len(rows)),
        "fraud_accuracy_by_stage": by_stage,
        "time_to_detection_s": {
            **_summary(list(seconds.values())),
            "n_detected": len(seconds),
            "n_fraud_calls": len(fraud_calls),
        },
        "turns_to_detection": _summary([float(t) for t in turns.values()]),
        "detection_rate": _ratio(len(seconds), len(fraud_calls)),
        "early_detection_rate": _ratio(len(early), len(fraud_calls)),
        "false_alarm_rate": _ratio(len(false_alarms), len(normal_calls)),
    }


def evaluate_predictions(preds: Sequence[RoundPrediction], *, alert_threshold: float = 0.0) -> dict[str, Any]:
    """Evaluate model outputs of any mix of rounds, whole calls and prefixes.

    Result keys:

    - "n_outputs", "well_formed_rate" (share of outputs that pass the format reward's test,
      `ParsedOutput.well_formed`), "mean_think_length" (mean SAFE-QAQ think-length estimate per output, 0 for
      an output without a think block), "confidence_source" ({"tokens", "stated"}: how many outputs carry
      the model's token confidence, how many only the stated number; see `prediction_confidence`): over all
      outputs of all rounds and stages;
    - "scene", "fraud" (the is_fraud round), "fraud_type", for each round present:
      `classification_metrics` over that round's rows with stage "complete" (prefixes are judged in
      "realtime"), plus "n_outputs", "well_formed_rate" and "mean_think_length" over *all* that round's rows;
    - "realtime", only when some row is a prefix (stage early_stage / late_stage), computed over the
      is_fraud rows of every stage. A row *alerts* when it predicts is_fraud true with confidence
      >= `alert_threshold` (a missing confidence counts as 0), as the server decides: the confidence is the
      model's token probability of its label when it was measured (`RoundPrediction.confidence`), else the
      number the output states (`prediction_confidence`).
      - "confidence_source": {"tokens", "stated"}: how many of these rows read which confidence;
      - "stage_accuracy": share of rows whose predicted conversation_stage equals the gold stage;
      - "fraud_accuracy_by_stage": per gold stage, the is_fraud accuracy of its rows (null = wrong);
      - "time_to_detection_s": per fraud call, the smallest audio_length among its alerting rows; mean and
        median over the detected fraud calls (null when none), with "n_detected" and "n_fraud_calls";
      - "turns_to_detection": the same with audio_idx (the measure for transcripts without audio lengths);
      - "detection_rate": share of fraud calls with an alert on any row;
      - "early_detection_rate": share of fraud calls with an alert on a row whose stage is not "complete",
        i.e. before the call ended;
      - "false_alarm_rate": share of normal calls with an alert on any row.
    """
    for p in preds:
        if p.stage not in STAGES:
            raise ValueError(f"call {p.call_id}: stage {p.stage!r} is not one of {', '.join(STAGES)}")
    # Parse each output once; every metric below reads these.
    parsed = [(p, parse_output(p.output, round=Round(p.task))) for p in preds]
    result: dict[str, Any] = _format_stats([o for _, o in parsed])
    result["confidence_source"] = confidence_sources(preds)
    for round_ in Round:
        rows = [(p, o) for p, o in parsed if Round(p.task) is round_]
        if not rows:
            continue
        complete = [(p, o) for p, o in rows if p.stage == Stage.COMPLETE]
        metrics = classification_metrics(
            [p.gold for p, _ in complete], [_label_of(o, round_) for _, o in complete]
        )
        result[TASK_KEYS[round_]] = {**metrics, **_format_stats([o for _, o in rows])}
    if any(p.stage != Stage.COMPLETE for p in preds):
        fraud_rows = [(p, o) for p, o in parsed if Round(p.task) is Round.FRAUD]
        result["realtime"] = _realtime(fraud_rows, alert_threshold)
    return result
