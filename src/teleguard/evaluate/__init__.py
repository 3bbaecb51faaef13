"""Evaluation of fraud-detector outputs: TeleAntiFraud classification metrics, real-time detection metrics and
reports that compare training stages."""

from teleguard.evaluate.metrics import (
    TASK_KEYS,
    UNKNOWN,
    RoundPrediction,
    classification_metrics,
    evaluate_predictions,
    predicted_label,
)
from teleguard.evaluate.report import write_report

__all__ = [
    "TASK_KEYS",
    "UNKNOWN",
    "RoundPrediction",
    "classification_metrics",
    "evaluate_predictions",
    "predicted_label",
    "write_report",
]
