"""Evaluation runs: a model's predictions on the held-out split, through an engine, into metrics and a report.

For each stage's model: greedy answers to every round of the eval split's whole calls (`grpo.jsonl`) and, when
asked, of its streaming prefixes (`realtime.jsonl`); then `evaluate_predictions` and a report comparing the
stages. Engines that report token log-probabilities (`generate_completions`) give each prediction the
detector's confidence, the model's probability of its label, which alerts decide on as in serving. Each
evaluation set built beside the splits (`<datasets>/eval_sets/<set>/grpo.jsonl`, docs/eval-sets.md)
is evaluated the same way, its whole-call rows only, into `results[stage]["eval_sets"][set]`. Predictions are
kept (`predictions-<stage>.jsonl`, `predictions-<stage>-<set>.jsonl`) so metrics can be recomputed without a
model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from teleguard.contract.labels import Stage
from teleguard.data.eval_sets import EVAL_SETS, EVAL_SETS_DIR
from teleguard.engines import Completion, Engine, SamplingParams, prompt_of_row
from teleguard.evaluate.metrics import RoundPrediction, evaluate_predictions
from teleguard.evaluate.report import write_report


def read_eval_rows(dataset_split: Path, *, realtime: bool, limit: int | None) -> list[dict[str, Any]]:
    files = ["grpo.jsonl"] + (["realtime.jsonl"] if realtime else [])
    rows: list[dict[str, Any]] = []
    for name in files:
        path = dataset_split / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (build the datasets with `teleguard data build`)")
        with path.open(encoding="utf-8") as f:
            part = [json.loads(line) for line in f if line.strip()]
        rows += part[:limit] if limit else part
    return rows


def read_eval_sets(datasets: Path, *, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """The whole-call rows of every evaluation set under `<datasets>/eval_sets/`, by set name (registry sets
    first, in registry order); the first `limit` rows of each. No sets built: an empty dict."""
    found = {path.parent.name: path for path in (datasets / EVAL_SETS_DIR).glob("*/grpo.jsonl")}
    order = [n for n in EVAL_SETS if n in found] + sorted(set(found) - set(EVAL_SETS))
    sets = {}
    for name in order:
        with found[name].open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r.get("conversation_stage", Stage.COMPLETE) == Stage.COMPLETE]
        sets[name] = rows[:limit] if limit else rows
    return sets


def predict(
    engine: Engine, rows: Sequence[dict[str, Any]], max_tokens: int, batch_size: int
) -> list[RoundPrediction]:
    """Greedy answers of `engine` to `rows`, one `RoundPrediction` each.

    An engine with `generate_completions` (`teleguard.engines.SwiftEngine`) also reports the answer tokens'
    log-probabilities, so each prediction carries the detector's confidence, the model's probability of its
    label (`Completion.confidence`, source "tokens"), read as the server reads it. A plain `generate` engine
    gives texts only: no confidence is measured and the metrics read the stated number (source "stated").
    """
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens)
    completions: list[Completion] = []
    generate_completions = getattr(engine, "generate_completions", None)
    for start in range(0, len(rows), batch_size):
        prompts = [prompt_of_row(r) for r in rows[start : start + batch_size]]
        if generate_completions is not None:
            completions += [outs[0] for outs in generate_completions(prompts, params)]
        else:
            completions += [Completion(outs[0]) for outs in engine.generate(prompts, params)]
    return [
        RoundPrediction(
            call_id=row["call_id"],
            task=row["task"],
            gold=row["answers"],
            output=completion.text,
            stage=row.get("conversation_stage", "complete"),
            audio_length=float(row.get("audio_length", 0.0)),
            audio_idx=int(row.get("audio_idx", 0)),
            confidence=completion.confidence(row["task"]),
            confidence_source="stated" if completion.logprobs is None else "tokens",
        )
        for row, completion in zip(rows, completions, strict=True)
    ]


def write_predictions(path: Path, predictions: Sequence[RoundPrediction]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p.__dict__, ensure_ascii=False) + "\n")


def read_predictions(path: Path) -> list[RoundPrediction]:
    """What `write_predictions` wrote."""
    with path.open(encoding="utf-8") as f:
        return [RoundPrediction(**json.loads(line)) for line in f if line.strip()]


def reasoning_of(rows: Sequence[dict[str, Any]], predictions: Sequence[RoundPrediction]) -> dict[str, Any]:
    """Whether the answers reason about their call: distinct thinks, and quotes found in the call as the
    prompt showed it (`teleguard.data.evidence.reasoning_figures`; rows and predictions in the same order)."""
    from teleguard.data.evidence import reasoning_figures

    shown = [next((m["content"] for m in row["messages"] if m["role"] == "user"), "") for row in rows]
    return reasoning_figures(zip(shown, (p.output for p in predictions), strict=True))


def evaluate_models(
    models: dict[str, Callable[[], Engine]],
    rows: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    max_tokens: int,
    batch_size: int = 16,
    alert_threshold: float = 0.0,
    title: str = "teleguard evaluation",
    eval_sets: Mapping[str, Sequence[dict[str, Any]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate each named model (an engine factory, so one model is loaded at a time) and write the report.

    `results[model]` is `evaluate_predictions` of the main rows; with `eval_sets` (set name -> rows, as from
    `read_eval_sets`) it also holds `results[model]["eval_sets"][set]`, the same metrics for each set.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name, make_engine in models.items():
        engine = make_engine()
        predictions = predict(engine, rows, max_tokens, batch_size)
        write_predictions(out_dir / f"predictions-{name}.jsonl", predictions)
        results[name] = evaluate_predictions(predictions, alert_threshold=alert_threshold)
        results[name]["reasoning"] = reasoning_of(rows, predictions)
        per_set = {}
        for set_name, set_rows in (eval_sets or {}).items():
            set_predictions = predict(engine, set_rows, max_tokens, batch_size)
            write_predictions(out_dir / f"predictions-{name}-{set_name}.jsonl", set_predictions)
            per_set[set_name] = evaluate_predictions(set_predictions, alert_threshold=alert_threshold)
        if per_set:
            results[name]["eval_sets"] = per_set
        close = getattr(engine, "close", None)
        if callable(close):
            close()  # a vLLM engine's process and cache go now, not whenever the collector gets to them
        del engine  # the next model loads only after this one is released
    write_report(results, out_dir, title=title)
    return results
