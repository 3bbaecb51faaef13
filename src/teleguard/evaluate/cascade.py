"""Offline evaluation of a confidence cascade: what a small model with a large fallback would have scored.

Given the outputs of a small and a large model for the same rows (prompts), `evaluate_cascade` replays the
serving cascade (`teleguard.engines.cascade`) row by row with the same escalation rule
(`teleguard.engines.cascade.escalation_reason`: no answer JSON, no confidence, or a confidence below the
threshold) on the same confidence: the small model's token probability of its label when it was measured
(`RoundPrediction.confidence`, as `teleguard.evaluate.run.predict` records it from the engine's
log-probabilities), else the number its output states, in [0, 1]
(`teleguard.evaluate.metrics.prediction_confidence`). It scores the small model alone, the large model alone
and the cascade (the small answer where it is confident, else the large one) with `evaluate_predictions`.
`write_cascade_report` writes the result as cascade.json and cascade.md.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from teleguard.contract.confidence import ConfidenceSource
from teleguard.contract.labels import Round
from teleguard.contract.parser import parse_output
from teleguard.engines.cascade import EscalationReason, escalation_reason
from teleguard.evaluate.metrics import (
    TASK_KEYS,
    RoundPrediction,
    confidence_sources,
    evaluate_predictions,
    predicted_label,
    prediction_confidence,
)

MODELS = ("small", "large", "cascade")
_MAX_MD_ROWS = 100  # escalated rows listed in cascade.md (cascade.json lists all)

RowKey = tuple[str, str, str, int, float]


def _key(p: RoundPrediction) -> RowKey:
    return (p.call_id, p.task, p.stage, p.audio_idx, p.audio_length)


def pair_predictions(
    small: Sequence[RoundPrediction], large: Sequence[RoundPrediction]
) -> tuple[list[tuple[int, RoundPrediction, RoundPrediction]], int, int]:
    """The rows both models answered, in the small model's order, as (small index, small row, large row).

    Rows are the same when call_id, task, stage, audio_idx and audio_length agree; repeated rows pair up in
    order. Returns the pairs and how many rows of the small and of the large model found no partner. Paired
    rows must agree on the gold label (ValueError otherwise).
    """
    waiting: dict[RowKey, deque[RoundPrediction]] = defaultdict(deque)
    for p in large:
        waiting[_key(p)].append(p)
    pairs: list[tuple[int, RoundPrediction, RoundPrediction]] = []
    unmatched_small = 0
    for i, p in enumerate(small):
        queue = waiting.get(_key(p))
        if not queue:
            unmatched_small += 1
            continue
        other = queue.popleft()
        if other.gold != p.gold:
            raise ValueError(
                f"call {p.call_id} ({p.task}, {p.stage}, turn {p.audio_idx}): the small model's row has gold "
                f"{p.gold!r}, the large model's {other.gold!r}"
            )
        pairs.append((i, p, other))
    return pairs, unmatched_small, sum(len(q) for q in waiting.values())


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def prediction_escalation(
    p: RoundPrediction, threshold: float
) -> tuple[EscalationReason | None, float | None, ConfidenceSource]:
    """Why the serving cascade would send this small-model answer to the large engine (None: it would not),
    with the confidence it decided on and that confidence's source (`prediction_confidence`).

    A stated confidence goes through `escalation_reason` itself (the server's rule for an engine without
    log-probabilities); a token confidence through the same rule on the measured number: unparsable when
    the output has no answer JSON, no_confidence when there is no label span (None), low_confidence below
    `threshold`, as `escalation_reason` does with the answer's logprobs.
    """
    round_ = Round(p.task)
    confidence, source = prediction_confidence(p)
    if source == "stated":
        return escalation_reason(p.output, round_, threshold), confidence, source
    if parse_output(p.output, round_).answer is None:
        return EscalationReason.UNPARSABLE, confidence, source
    if confidence is None:
        return EscalationReason.NO_CONFIDENCE, confidence, source
    return (EscalationReason.LOW_CONFIDENCE if confidence < threshold else None), confidence, source


def evaluate_cascade(
    small: Sequence[RoundPrediction], large: Sequence[RoundPrediction], threshold: float
) -> dict[str, Any]:
    """Score the small model, the large model and their cascade at `threshold` on the rows both answered.

    A row is escalated when the small model's output is unsure (the serving cascade's rule, on the token
    confidence when it was measured, else the stated one: `prediction_escalation`); the cascade's row is then
    the large model's (output and confidence), else the small model's. Result keys:

    - "threshold"; "n_rows": rows both models answered; "n_unmatched": {"small", "large"}: rows only one did
      (left out of everything below);
    - "confidence_source": {"tokens", "stated"}: how many of the small model's paired rows were decided on
      its token confidence, how many on the stated number;
    - "n_escalated", "escalation_rate" (escalated / n_rows), "escalation_reasons": {low_confidence,
      no_confidence, unparsable: count};
    - "by_task": per task present ("scene", "fraud", "fraud_type"): "n_rows", "n_escalated",
      "escalation_rate", "n_scored" (the rows with stage "complete", which the accuracies are over, as in
      `evaluate_predictions`; prefixes are judged in its "realtime" block), "accuracy" and "macro_f1", each
      {"small", "large", "cascade"};
    - "small", "large", "cascade": the full `evaluate_predictions` result of each on the paired rows;
    - "escalated": one entry per escalated row, in the small model's order: "row" (its index in `small`),
      "call_id", "task", "stage", "audio_idx", "audio_length", "gold", "reason", "small_confidence" (the
      confidence the rule read), "confidence_source", "small_label", "large_label"; "escalated_call_ids":
      the sorted distinct call ids among them.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    pairs, unmatched_small, unmatched_large = pair_predictions(small, large)
    rows: dict[str, list[RoundPrediction]] = {name: [] for name in MODELS}
    escalated: list[dict[str, Any]] = []
    reasons = dict.fromkeys((r.value for r in EscalationReason), 0)
    for index, s, g in pairs:
        reason, confidence, source = prediction_escalation(s, threshold)
        rows["small"].append(s)
        rows["large"].append(g)
        answered = replace(s, output=g.output, confidence=g.confidence, confidence_source=g.confidence_source)
        rows["cascade"].append(s if reason is None else answered)
        if reason is None:
            continue
        reasons[reason.value] += 1
        escalated.append(
            {
                "row": index,
                "call_id": s.call_id,
                "task": s.task,
                "stage": s.stage,
                "audio_idx": s.audio_idx,
                "audio_length": s.audio_length,
                "gold": s.gold,
                "reason": reason.value,
                "small_confidence": confidence,
                "confidence_source": source,
                "small_label": predicted_label(s),
                "large_label": predicted_label(g),
            }
        )
    results = {name: evaluate_predictions(rows[name]) for name in MODELS}
    by_task: dict[str, dict[str, Any]] = {}
    for round_ in Round:
        task = TASK_KEYS[round_]
        n = sum(Round(p.task) is round_ for p in rows["small"])
        if not n:
            continue
        n_escalated = sum(Round(e["task"]) is round_ for e in escalated)
        by_task[task] = {
            "n_rows": n,
            "n_escalated": n_escalated,
            "escalation_rate": _ratio(n_escalated, n),
            "n_scored": results["small"][task]["n_samples"],
            "accuracy": {name: results[name][task]["accuracy"] for name in MODELS},
            "macro_f1": {name: results[name][task]["macro_f1"] for name in MODELS},
        }
    return {
        "threshold": threshold,
        "n_rows": len(pairs),
        "n_unmatched": {"small": unmatched_small, "large": unmatched_large},
        "confidence_source": confidence_sources(rows["small"]),
        "n_escalated": len(escalated),
        "escalation_rate": _ratio(len(escalated), len(pairs)),
        "escalation_reasons": reasons,
        "by_task": by_task,
        **results,
        "escalated": escalated,
        "escalated_call_ids": sorted({e["call_id"] for e in escalated}),
    }


# --- the report ----------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def cascade_markdown(result: dict[str, Any]) -> str:
    """The result of `evaluate_cascade` as a Markdown section."""
    lines = [
        f"# Confidence cascade (threshold {result['threshold']:.2f})",
        "",
        f"Rows answered by both models: {result['n_rows']} (only the small model: "
        f"{result['n_unmatched']['small']}, only the large model: {result['n_unmatched']['large']}). "
        f"Escalated to the large model: {result['n_escalated']} ({result['escalation_rate']:.1%}).",
        "",
        f"The small model's confidence: its token probability of the label for "
        f"{result['confidence_source']['tokens']} rows, the number it states for "
        f"{result['confidence_source']['stated']} (an engine without log-probabilities).",
        "",
        *_table(
            ["reason", "rows"],
            [[reason, str(count)] for reason, count in result["escalation_reasons"].items()],
        ),
        "",
        "## Accuracy by task",
        "",
        "Accuracy and macro F1 over the rows of whole calls (stage complete), as in the evaluation report.",
        "",
    ]
    rows = []
    for task, t in result["by_task"].items():
        rows.append(
            [
                task,
                str(t["n_rows"]),
                str(t["n_scored"]),
                f"{t['n_escalated']} ({t['escalation_rate']:.1%})",
                *(_num(t["accuracy"][name]) for name in MODELS),
                *(_num(t["macro_f1"][name]) for name in MODELS),
            ]
        )
    headers = ["task", "rows", "scored", "escalated"]
    headers += [f"accuracy {name}" for name in MODELS] + [f"macro F1 {name}" for name in MODELS]
    lines += [*_table(headers, rows), ""]
    escalated = result["escalated"]
    if escalated:
        shown = escalated[:_MAX_MD_ROWS]
        more = len(escalated) - len(shown)
        lines += [
            "## Escalated rows",
            "",
            *_table(
                [
                    "row",
                    "call",
                    "task",
                    "stage",
                    "turns",
                    "reason",
                    "small confidence",
                    "small",
                    "large",
                    "gold",
                ],
                [
                    [
                        str(e["row"]),
                        e["call_id"],
                        e["task"],
                        e["stage"],
                        str(e["audio_idx"]),
                        e["reason"],
                        _num(e["small_confidence"], 2),
                        e["small_label"],
                        e["large_label"],
                        e["gold"],
                    ]
                    for e in shown
                ],
            ),
        ]
        if more:
            lines += ["", f"... and {more} more (cascade.json lists all)."]
        lines.append("")
    return "\n".join(lines)


def write_cascade_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `evaluate_cascade`'s result to `out_dir` as cascade.json and cascade.md; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "cascade.json", "markdown": out / "cascade.md"}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(cascade_markdown(result), encoding="utf-8")
    return paths
