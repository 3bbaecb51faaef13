"""Evaluation steps: offline metrics of the compared models, the deployed detector live, the seed recipes'
report sections, and the final model's figures as KFP metrics."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from teleguard.pipeline.steps.common import step_recipe


def evaluate_step(
    recipe: str, overrides: dict[str, Any], datasets: Path, models: dict[str, Path], out_report: Path
) -> dict[str, dict[str, Any]]:
    """Greedy predictions of each model on the held-out split and on the evaluation sets built beside it;
    metrics and a report comparing them."""
    from teleguard.engines import recipe_engine
    from teleguard.evaluate.run import evaluate_models, read_eval_rows, read_eval_sets

    cfg = step_recipe(recipe, overrides, datasets=str(datasets))
    e = cfg.evaluate
    engines = {
        name: (lambda path=path: recipe_engine(cfg, path, datasets, kind=e.engine, batch_size=e.batch_size))
        for name, path in models.items()
    }
    rows = read_eval_rows(datasets / cfg.data.eval_split, realtime=e.realtime, limit=e.limit)
    sets = read_eval_sets(datasets, limit=e.limit) if e.eval_sets else {}
    return evaluate_models(
        engines, rows, out_report, max_tokens=e.max_tokens, batch_size=e.batch_size, alert_threshold=e.alert_threshold,
        title=f"{cfg.name}: evaluation on {cfg.data.eval_split}", eval_sets=sets,
    )  # fmt: skip


def evaluate_with_live_step(
    recipe: str,
    overrides: dict[str, Any],
    datasets: Path,
    calls: Path,
    models: dict[str, Path],
    out_report: Path,
    audio_calls: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """`evaluate_step`, then (per the recipe's `evaluate.live`) the final model as deployed
    (`live_evaluation_step`): its flat live figures land in `results["final"]["live"]`, the baseline's in
    `results["baseline"]`, and the live section is appended to report.md."""
    results = evaluate_step(recipe, overrides, datasets, models, out_report)
    if not step_recipe(recipe, overrides).evaluate.live.enabled:
        return results
    live = live_evaluation_step(
        recipe, overrides, calls, models["final"], out_report / "live", audio_calls=audio_calls
    )
    results["final"]["live"] = {k: v for k, v in live["figures"].items() if k.startswith("live_")}
    results["final"]["live_metrics"] = live["metrics"]
    if live["baseline"] is not None:
        results["baseline"] = {k: v for k, v in live["figures"].items() if k.startswith("baseline_")}
    heading = "The deployed detector, live on held-out calls"
    section = (out_report / "live" / "live.md").read_text("utf-8")
    with (out_report / "report.md").open("a", encoding="utf-8") as f:
        f.write(f"\n## {heading}\n\n" + section.split("\n", 1)[1])
    # the same section in the HTML report (the Kubeflow UI shows that one): live.html's body after its title
    page = (out_report / "report.html").read_text("utf-8")
    body = (out_report / "live" / "live.html").read_text("utf-8").split("</h1>", 1)[1].split("</body>", 1)[0]
    page = page.replace("</body>", f"<h2>{heading}</h2>{body}</body>", 1)
    (out_report / "report.html").write_text(page, "utf-8")
    (out_report / "metrics.json").write_text(json.dumps(results, indent=2, default=str) + "\n", "utf-8")
    return results


def live_evaluation_step(
    recipe: str,
    overrides: dict[str, Any],
    calls: Path,
    model: Path,
    out_report: Path,
    *,
    audio_calls: Path | None = None,
) -> dict[str, Any]:
    """The exported model as it is deployed: the held-out calls of `calls` (a build-data calls folder) replayed
    turn by turn through the detector's own code with the model's serving profile, scored with the live
    metrics, next to a TF-IDF baseline trained on the training calls. Writes live.json/.md/.html and the
    replay's per-call results; returns {"metrics", "figures" (flat, for KFP and the gate), "baseline"}.
    A model served on audio is streamed the synthesized audio of `audio_calls` (the audio step's calls)."""
    from teleguard.data.dataset import CALLS_FILE, read_calls
    from teleguard.engines.contract import EngineConfig
    from teleguard.evaluate.baseline import offline_figures, run_baseline
    from teleguard.evaluate.live import (
        live_figures,
        live_metrics,
        monitoring_policy,
        replay_model,
        write_live_report,
        write_results,
    )
    from teleguard.pipeline.demo_serving import pick_calls
    from teleguard.serve.policy import DecisionPolicy
    from teleguard.serve.profile import apply_profile, describe

    cfg = step_recipe(recipe, overrides)
    live = cfg.evaluate.live
    policy, profile = apply_profile(model, DecisionPolicy())
    print(describe(profile, model))
    replayed = calls
    if (
        policy.modality == "audio"
        and audio_calls
        and (audio_calls / cfg.data.eval_split / CALLS_FILE).is_file()
    ):
        replayed = audio_calls
    test = read_calls(replayed / cfg.data.eval_split)
    if live.limit is not None and live.limit < len(test):  # both labels, in proportion
        n_fraud = round(live.limit * sum(c.labels.is_fraud for c in test) / len(test))
        test = pick_calls(test, fraud=n_fraud, normal=live.limit - n_fraud)
    engine = EngineConfig(
        kind=cfg.evaluate.engine,
        model=str(model),
        device="cpu" if cfg.device == "cpu" else "auto",
        max_batch_size=live.max_batch_size,
        timeout_s=600,
    )
    started = time.perf_counter()
    results = replay_model(
        test, engine, monitoring_policy(policy) if live.exact_sweep else policy, concurrency=live.concurrency
    )
    replay_s = time.perf_counter() - started
    out_report.mkdir(parents=True, exist_ok=True)
    write_results(out_report / "live-results.jsonl", results)
    metrics = live_metrics(results, max_false_alarm_rate=live.max_false_alarm_rate)
    metrics["replay_seconds"] = round(replay_s, 2)
    columns = {"model": metrics}
    figures = live_figures(metrics)
    baseline: dict[str, Any] | None = None
    base = None
    if live.baseline:
        train = read_calls(calls / cfg.data.train_split)
        try:
            base = run_baseline(
                train, test, policy, max_chars=policy.max_transcript_chars,
                alert_threshold=policy.alert_threshold, max_false_alarm_rate=live.max_false_alarm_rate,
            )  # fmt: skip
        except ValueError as err:  # e.g. training calls of one label only: the model's figures still stand
            print(f"no baseline: {err}")
    if base is not None:
        columns["TF-IDF + LR baseline"] = base["live"]
        baseline = {"offline": base["offline"], "live": base["live"], "seconds": base["seconds"]}
        figures |= offline_figures(base["offline"]) | live_figures(base["live"], prefix="baseline_live_")
    write_live_report(columns, out_report, baseline_offline=baseline["offline"] if baseline else None)
    return {"metrics": metrics, "figures": figures, "baseline": baseline}


def evaluate_recipe_step(
    recipe: str,
    overrides: dict[str, Any],
    datasets: Path,
    models: dict[str, Path],
    out_report: Path,
    *,
    classifier: Path | None = None,
    cascade: tuple[str, str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """`evaluate_step`, plus what a seed recipe adds to its report:

    - `classifier`: the fraud-classifier reward's mean and spread for each model's answers (before/after RL);
    - `cascade` (small, large, threshold): escalation rate and accuracy with and without the confidence cascade.
    """
    from teleguard.evaluate.run import read_predictions

    results = evaluate_step(recipe, overrides, datasets, models, out_report)
    sections: list[str] = []
    if classifier is not None:
        from teleguard.rewards.classifier import classifier_reward_stats, reward_stats_markdown

        stats = {
            name: classifier_reward_stats(
                classifier, read_predictions(out_report / f"predictions-{name}.jsonl")
            )
            for name in models
        }
        for name, value in stats.items():
            results[name]["classifier_reward"] = value
        (out_report / "classifier-reward.json").write_text(json.dumps(stats, indent=2) + "\n", "utf-8")
        sections.append("## Fraud-classifier reward per model\n\n" + reward_stats_markdown(stats))
    if cascade is not None:
        from teleguard.evaluate.cascade import cascade_markdown, evaluate_cascade, write_cascade_report

        small, large, threshold = cascade
        result = evaluate_cascade(
            read_predictions(out_report / f"predictions-{small}.jsonl"),
            read_predictions(out_report / f"predictions-{large}.jsonl"),
            threshold,
        )
        write_cascade_report(result, out_report)
        results[small]["cascade"] = {
            k: result[k] for k in ("threshold", "n_rows", "n_escalated", "escalation_rate")
        }
        results[small]["cascade"]["by_task"] = result["by_task"]
        sections.append(cascade_markdown(result))
    if sections:
        with (out_report / "report.md").open("a", encoding="utf-8") as f:
            f.write("\n" + "\n\n".join(sections) + "\n")
        (out_report / "metrics.json").write_text(json.dumps(results, indent=2, default=str) + "\n", "utf-8")
    return results


def log_evaluation(
    final: dict[str, Any], details: Path, metrics: Any, confusion: Any, report_html: str, report_md: str
) -> str:
    """The final model's figures as KFP Metrics and ClassificationMetrics, the reports as HTML and Markdown
    artifacts; returns the figures the quality gate reads (JSON)."""
    for task in ("scene", "fraud", "fraud_type"):
        for key in ("accuracy", "weighted_f1", "macro_f1"):
            if task in final:
                metrics.log_metric(f"{task}_{key}", round(final[task][key], 4))
    metrics.log_metric("well_formed_rate", round(final["well_formed_rate"], 4))
    metrics.log_metric("mean_think_length", round(final["mean_think_length"], 2))
    for key in ("stage_accuracy", "early_detection_rate", "false_alarm_rate"):
        if key in final.get("realtime", {}):
            metrics.log_metric(key, round(final["realtime"][key], 4))
    for name, result in final.get("eval_sets", {}).items():
        if "fraud" in result:
            metrics.log_metric(f"{name}_fraud_accuracy", round(result["fraud"]["accuracy"], 4))
    if (final.get("classifier_reward") or {}).get("mean") is not None:
        metrics.log_metric("classifier_reward_mean", round(final["classifier_reward"]["mean"], 4))
    if "cascade" in final:
        metrics.log_metric("cascade_escalation_rate", round(final["cascade"]["escalation_rate"], 4))
    if "fraud" in final:
        matrix = final["fraud"]["confusion_matrix"]
        confusion.log_confusion_matrix(matrix["labels"], matrix["matrix"])
    shutil.copy(details / "report.html", report_html)
    shutil.copy(details / "report.md", report_md)
    for key, value in final.get("live", {}).items():
        metrics.log_metric(key, round(value, 4))
    return json.dumps(
        {k: final.get(k) for k in ("fraud", "well_formed_rate", "mean_think_length", "live")}, default=str
    )
