"""A readable summary of a local pipeline run: what each step did, the evaluation figures, where the report is.

It reads what KFP's local runner leaves behind: one folder per step holding the step's artifacts and its
`executor_output.json` (the step's returned value under `parameterValues.Output`), and what
`teleguard.pipeline.progress` adds: `logs/<step>.log` and every step's seconds in `logs/steps.json`. The steps
and what each is for come from the pipeline's definition (`PipelineInfo.steps()`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "pipeline-summary.json"
# a training step's metrics (ms-swift's last log line) worth a glance, with their labels
TRAINING_FIGURES = {
    "global_step/max_steps": "steps",
    "train_loss": "loss",
    "reward": "reward",
    "completions/mean_length": "completion tokens",
    "train_runtime": "seconds",
    "rows": "rows",
}


def step_output(run_dir: Path, step: str) -> Any:
    """The step's returned value (decoded when it is JSON), or None when the step did not run."""
    path = run_dir / step / "executor_output.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text("utf-8")).get("parameterValues", {}).get("Output")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _figures(step: str, out: Any) -> str:
    """The few figures that tell a reader how the step went."""
    if not isinstance(out, dict):
        return "" if out is None else _number(out)
    if out.get("skipped"):
        return "switched off: input passed through"
    if step == "build-data":
        train = out["rows"].get("train", {})
        return f"{out['calls']} calls ({out['rejected']} rejected); train rows: " + ", ".join(
            f"{k.removesuffix('_rows')} {v}" for k, v in train.items()
        )
    if step == "select-shortest-correct":
        return f"kept {out['kept']} of {out['prompts']} prompts (solved rate {out['solved_rate']:.2f})"
    return ", ".join(f"{label} {_number(out[key])}" for key, label in TRAINING_FIGURES.items() if key in out)


def summarize_run(
    run_dir: Path, pipeline_steps: dict[str, str], arguments: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's steps (`pipeline_steps`: the definition's steps), the evaluation of each compared model, the gate's
    verdict with each of its checks (the thresholds from the run's `arguments`) and where things are."""
    from teleguard.pipeline.progress import LOGS_DIR, TIMES_FILE

    logs = run_dir / LOGS_DIR
    times = json.loads((logs / TIMES_FILE).read_text("utf-8")) if (logs / TIMES_FILE).is_file() else {}
    steps = []
    evaluate = next((s for s in pipeline_steps if s.startswith("evaluate")), "evaluate")
    for step, what in pipeline_steps.items():
        ran = (run_dir / step).is_dir()
        out = step_output(run_dir, step)
        steps.append(
            {
                "step": step,
                "what": what,
                "ran": ran,
                "seconds": times.get(step, {}).get("seconds") if ran else None,
                "figures": _figures(step, out) if ran else "",
            }
        )
    metrics_file = run_dir / evaluate / "details" / "metrics.json"
    evaluation = json.loads(metrics_file.read_text("utf-8")) if metrics_file.is_file() else {}
    summary = {
        "run": str(run_dir),
        "steps": steps,
        "evaluation": {
            model: {
                **{
                    f"{task}_{key}": m.get(task, {}).get(key)
                    for task in ("scene", "fraud", "fraud_type")
                    for key in ("accuracy", "macro_f1")
                },
                "well_formed_rate": m.get("well_formed_rate"),
                "mean_think_length": m.get("mean_think_length"),
            }
            for model, m in evaluation.items()
            if model != "baseline"  # the baseline's figures are flat
        }
        | _baseline_offline(evaluation),
        "live": _live(evaluation),
        "eval_sets": {
            model: {name: r.get("fraud", {}).get("accuracy") for name, r in m.get("eval_sets", {}).items()}
            for model, m in evaluation.items()
            if model != "baseline"
        },
        "gate_passed": step_output(run_dir, "quality-gate"),
        "gate_checks": _gate_checks(evaluation, arguments or {}),
        "registered": step_output(run_dir, "register-model"),
        "report": str(run_dir / evaluate / "details" / "report.md") if evaluation else None,
        "report_html": str(run_dir / evaluate / "report") if evaluation else None,
        "logs": str(logs) if logs.is_dir() else None,
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    return summary


# the live figures the summary shows: (flat figure name without prefix, label, kind)
LIVE_ROWS = (
    ("verdict_accuracy", "is it fraud: verdict accuracy", "ratio"),
    ("precision", "is it fraud: precision", "ratio"),
    ("recall", "is it fraud: recall", "ratio"),
    ("false_alarm_rate", "false alarms on normal calls", "ratio"),
    ("fraud_type_accuracy", "fraud type: accuracy of the verdicts", "ratio"),
    ("scene_accuracy", "scene: accuracy of the verdicts", "ratio"),
    ("time_to_detection_s_median", "time to detection, median (s)", "seconds"),
    ("detection_fraction_median", "time to detection, median share of the call", "ratio"),
    ("flagged_within_quarter", "fraud calls flagged in the first 25 %", "ratio"),
    ("flagged_within_half", "fraud calls flagged in the first 50 %", "ratio"),
    ("model_calls_per_call", "model calls per call", "number"),
    ("latency_p50_s", "decision latency p50 (s)", "seconds"),
    ("latency_p99_s", "decision latency p99 (s)", "seconds"),
    ("ece", "calibration error (ECE) of is-fraud confidence", "ratio"),
    ("operating_threshold", "suggested alert threshold (false alarms <= target)", "number"),
)


def _gate_checks(evaluation: dict[str, Any], arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """The quality gate's checks as its step made them, from the run's thresholds (none without them)."""
    from teleguard.pipeline.steps.registration import GATE_FIGURES, gate_checks

    thresholds = {p: arguments[p] for p, _, _ in GATE_FIGURES if p in arguments}
    if "final" not in evaluation or len(thresholds) < len(GATE_FIGURES):
        return []
    return gate_checks(evaluation["final"], thresholds)


def _baseline_offline(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The TF-IDF baseline's offline figures as a row of the offline table (none without a baseline)."""
    flat = evaluation.get("baseline", {})
    if not flat:
        return {}
    row: dict[str, Any] = {
        f"{task}_{key}": flat.get(f"baseline_offline_{task}_{key}")
        for task in ("scene", "fraud", "fraud_type")
        for key in ("accuracy", "macro_f1")
    }
    return {"TF-IDF + LR baseline": {**row, "well_formed_rate": None, "mean_think_length": None}}


def _live(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The deployed model's live figures and the baseline's, without their prefixes (empty without a live
    evaluation)."""
    final = evaluation.get("final", {}).get("live", {})
    if not final:
        return {}
    out = {"model": {k.removeprefix("live_"): v for k, v in final.items()}}
    baseline = evaluation.get("baseline", {})
    if baseline:
        out["TF-IDF + LR baseline"] = {
            k.removeprefix("baseline_live_"): v for k, v in baseline.items() if k.startswith("baseline_live_")
        }
    return out


def print_summary(summary: dict[str, Any], title: str = "SAFE-QAQ pipeline") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    steps = Table(title=f"{title} (KFP local runner)", title_justify="left")
    for column in ("step", "what", "", "s", "figures"):
        steps.add_column(column, overflow="fold", justify="right" if column == "s" else "left")
    for s in summary["steps"]:
        seconds = s.get("seconds")
        steps.add_row(
            s["step"],
            s["what"],
            "[green]ran[/]" if s["ran"] else "[dim]not run[/]",
            "" if seconds is None else f"{seconds:.0f}",
            s["figures"],
        )
    console.print(steps)
    if summary["evaluation"]:
        table = Table(
            title="offline evaluation on the held-out split (every round, greedy, whole calls)",
            title_justify="left",
        )
        columns = ("model", "scene acc", "scene macro F1", "fraud acc", "fraud macro F1", "type acc",
                   "type macro F1", "well-formed", "think length")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="right" if column != "model" else "left")
        for model, m in summary["evaluation"].items():
            table.add_row(model, *(_number(v) if v is not None else "-" for v in m.values()))
        console.print(table)
    live = summary.get("live") or {}
    if live:
        calls = int(live["model"].get("calls") or 0)
        table = Table(
            title=f"live evaluation: the deployed detector on {calls} held-out calls, fed turn by turn",
            title_justify="left",
        )
        table.add_column("figure")
        for column in live:
            table.add_column(column, justify="right")
        for key, label, _kind in LIVE_ROWS:
            values = [live[column].get(key) for column in live]
            if any(v is not None for v in values):
                table.add_row(label, *(_number(v) if v is not None else "-" for v in values))
        console.print(table)
    sets = {name for per_model in summary.get("eval_sets", {}).values() for name in per_model}
    if sets:
        table = Table(title="fraud accuracy on the gold and red-team sets", title_justify="left")
        models = list(summary["eval_sets"])
        for column in ("set", *models):
            table.add_column(column, justify="right" if column != "set" else "left")
        for name in sorted(sets):
            values = [summary["eval_sets"][m].get(name) for m in models]
            table.add_row(name, *(_number(v) if v is not None else "-" for v in values))
        console.print(table)
    if any(s["step"] == "quality-gate" for s in summary["steps"]):  # the seed recipes have no gate
        verdict = {True: "[green]passed[/]", False: "[red]failed[/]"}.get(
            summary["gate_passed"], "not reached"
        )
        console.print(f"quality gate: {verdict}")
        for c in summary.get("gate_checks", []):
            mark = "[green]pass[/]" if c["passed"] else "[red]FAIL[/]"
            sign = ">=" if c["kind"] == "min" else "<="
            value = "missing" if c["value"] is None else _number(c["value"])
            console.print(
                f"  {mark} {c['figure']} {value} {sign} {c['limit']:g}  ({c['parameter']})", highlight=False
            )
    where = {"highlight": False, "soft_wrap": True}  # paths on one line, to copy
    if summary["registered"]:
        console.print(f"registered model: {summary['registered']}", **where)
    if summary["report"]:
        console.print(f"report: {summary['report']} (HTML: {summary['report_html']})", **where)
    console.print(f"artifacts of every step: {summary['run']}", **where)
    if summary.get("logs"):
        console.print(f"full log of every step: {summary['logs']}/<step>.log", **where)
