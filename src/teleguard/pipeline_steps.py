"""What each Kubeflow Pipelines step does, as plain functions over folders.

The KFP components (components/) are thin: each imports one function from here and hands it its artifact
folders. The same functions run in a pod on the cluster and in KFP's local runner on this machine. A stage
that the pipeline's parameters switch off passes its input model through, so every step's artifacts exist
whichever stages ran.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teleguard.train.config import Recipe, load_recipe

if TYPE_CHECKING:
    from teleguard.train.trainjob import TrainJobRunner, TrainJobSettings


# Calls per evaluation set in the pipeline: few, as every compared model is evaluated on every set, on CPU too.
PIPELINE_EVAL_SET_SIZE = 32


def copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, dirs_exist_ok=True)


def _source_files(data_uri: str) -> list[Path]:
    from teleguard.storage import local_copy

    folder = local_copy(data_uri) if "://" in data_uri else Path(data_uri)
    if folder.is_file():
        return [folder]
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in (".jsonl", ".json") and p.name != "manifest.json"
    )
    if not files:
        raise FileNotFoundError(f"{data_uri}: no .jsonl or .json files")
    return files


def build_data_step(
    data_uri: str,
    out_calls: Path,
    out_datasets: Path,
    *,
    source_format: str = "dialogues",
    prompts: str | None = None,
    max_transcript_chars: int | None = None,
    evidence_chars: int | None = None,
    split_seed: int = 0,
    eval_sets: list[str] | None = None,
    eval_set_size: int = PIPELINE_EVAL_SET_SIZE,
) -> dict[str, Any]:
    """Ingest (bad rows skipped and counted), split by call, and build every stage's text datasets, with the
    evaluation sets `eval_sets` (None: all) of up to `eval_set_size` calls (few: evaluation runs on CPU too)."""
    from teleguard.data.dataset import build_datasets, write_calls
    from teleguard.data.eval_sets import EVAL_SETS_DIR
    from teleguard.data.ingest import ingest
    from teleguard.data.splits import SplitSpec, split_calls
    from teleguard.data.timing import estimate_times

    calls, report = ingest(_source_files(data_uri), source_format, on_error="skip")  # type: ignore[arg-type]
    calls = [estimate_times(c) for c in calls]
    for name, part in split_calls(calls, SplitSpec(seed=split_seed)).items():
        write_calls(out_calls / name, part, title=f"{name} split", rejected=len(report.rejected))
    cards = build_datasets(
        out_calls,
        out_datasets,
        prompts=prompts,
        max_transcript_chars=max_transcript_chars,
        evidence_chars=evidence_chars,
        eval_sets=eval_sets,
        eval_set_size=eval_set_size,
    )
    index_file = out_datasets / EVAL_SETS_DIR / "card.json"
    index = json.loads(index_file.read_text("utf-8")) if index_file.is_file() else {}
    return {
        "calls": len(calls),
        "rejected": len(report.rejected),
        "rows": {k: v["rows"] for k, v in cards.items()},
        "eval_sets": index.get("built", {}),
    }


def synthesize_audio_step(
    calls: Path, out_calls: Path, out_datasets: Path, *, limit: int | None = None, prompts: str | None = None
) -> dict[str, Any]:
    """Synthesize audio for (the first `limit` calls of) each split and build the audio datasets (with the
    evaluation sets that keep their audio: gold, very_short)."""
    from teleguard.data.audio import synthesize_call
    from teleguard.data.audio_clips import ClipWriter
    from teleguard.data.dataset import CALLS_FILE, build_datasets, read_calls, write_calls
    from teleguard.data.splits import SPLITS

    counts = {}
    for name in SPLITS:
        if not (calls / name / CALLS_FILE).is_file():
            continue
        folder = out_calls / name
        voiced = [
            synthesize_call(call, folder / "audio" / f"{i:06d}.wav")
            for i, call in enumerate(read_calls(calls / name)[:limit])
        ]
        write_calls(folder, voiced, title=f"{name} split with audio")
        counts[name] = len(voiced)
    cards = build_datasets(
        out_calls, out_datasets, modality="audio", prompts=prompts, clip_maker=ClipWriter(out_datasets),
        eval_set_size=PIPELINE_EVAL_SET_SIZE,
    )  # fmt: skip
    return {"calls": counts, "rows": {k: v["rows"] for k, v in cards.items()}}


def step_recipe(recipe: str, overrides: dict[str, Any], **paths: str | None) -> Recipe:
    """The recipe with the step's folders (model path, datasets, output_dir) and the user's overrides."""
    where = {"model_path": "model.path", "datasets": "data.datasets", "output_dir": "output_dir"}
    return load_recipe(recipe, {**overrides, **{where[k]: v for k, v in paths.items() if v}})


def start_model_step(
    recipe: str, overrides: dict[str, Any], base_model_uri: str, datasets: Path, out_model: Path
) -> None:
    """The pipeline's first model: `base_model_uri`, or the recipe's model (a tiny one is built if so configured,
    its tokenizer trained on the datasets)."""
    from teleguard.train.stages import Runner

    with tempfile.TemporaryDirectory(prefix="teleguard-base-") as tmp:
        paths = {"output_dir": tmp, "datasets": str(datasets)}
        cfg = step_recipe(recipe, overrides, model_path=base_model_uri or None, **paths)
        if cfg.model.build_tiny is not None and not base_model_uri and "://" not in cfg.model.path:
            cfg = step_recipe(recipe, overrides, model_path=str(Path(tmp) / "base"), **paths)
        copy_tree(Runner(cfg, log=print).start_model(cfg.enabled()[0]), out_model)


def train_stage_step(
    stage: str,
    enabled: bool,
    recipe: str,
    overrides: dict[str, Any],
    datasets: Path,
    start_model: Path,
    out_model: Path,
    *,
    selection: Path | None = None,
    inputs: dict[str, Path] | None = None,
    side_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run one training stage (or pass the model through when switched off); its model goes to `out_model`.

    `inputs` ({"sample": folder}) are earlier steps' outputs the stage reads from its run folder; `side_models`
    ({"rm": folder, "classifier": folder}) the side-stage models it uses."""
    if not enabled:
        copy_tree(start_model, out_model)
        return {"skipped": True}
    from teleguard.train.stages import Runner

    with tempfile.TemporaryDirectory(prefix=f"teleguard-{stage}-") as tmp:
        cfg = step_recipe(
            recipe, {**overrides, f"stages.{stage}.enabled": True}, datasets=str(datasets), output_dir=tmp
        )
        if selection is not None:  # RSFT trains on what the selection step kept
            copy_tree(selection, Path(tmp) / "sample")
        for name, folder in (inputs or {}).items():
            copy_tree(folder, Path(tmp) / name)
        result = Runner(cfg, log=print, side_models=side_models).run(stage, start_model=start_model)
        copy_tree(result.model, out_model)
        (out_model / "stage-manifest.json").write_text(
            json.dumps(result.manifest, indent=2, default=str), "utf-8"
        )
        return result.manifest.get("metrics", {})


def stage_step(
    stage: str,
    enabled: bool,
    recipe: str,
    overrides: dict[str, Any],
    datasets: Any,
    start: Any,
    model: Any,
    *,
    inputs: dict[str, Any] | None = None,
    side_models: dict[str, Any] | None = None,
) -> str:
    """`train_stage_step` for a component: KFP artifacts in (anything with a `.path`), the metrics as JSON out."""
    metrics = train_stage_step(
        stage, enabled, recipe, overrides, Path(datasets.path), Path(start.path), Path(model.path),
        inputs={k: Path(v.path) for k, v in (inputs or {}).items()},
        side_models={k: Path(v.path) for k, v in (side_models or {}).items()},
    )  # fmt: skip
    return json.dumps(metrics, default=str)


def trainjob_stage_step(
    stage: str,
    recipe: str,
    overrides: dict[str, Any],
    *,
    datasets_uri: str,
    start_model_uri: str,
    output_uri: str,
    out_model: Path,
    settings: TrainJobSettings,
    runner: TrainJobRunner | None = None,
) -> dict[str, Any]:
    """Run one stage as a multi-node TrainJob and put the model node 0 uploaded into `out_model`.

    The URIs are the step's artifact URIs: the pipeline root must be in S3/MinIO so every node can read them.
    """
    from teleguard.storage import get_dir
    from teleguard.train.manifest import read_manifest
    from teleguard.train.trainjob import TrainJobRunner, stage_command, trainjob_manifest

    local = [u for u in (datasets_uri, start_model_uri, output_uri) if "://" not in u]
    if local:
        raise ValueError(
            f"a stage on {settings.num_nodes} nodes reads and writes its artifacts in S3/MinIO, but {local[0]} is "
            "a local path: set the pipeline root to an s3:// or minio:// URI (manifests/kfp-launcher-minio.yaml)"
        )
    output_dir = f"{output_uri.rstrip('/')}-trainjob"
    step_recipe(
        recipe, overrides, datasets=datasets_uri, output_dir=output_dir
    )  # fail here, not on the nodes
    name = f"teleguard-{stage}-{hashlib.sha256(output_uri.encode()).hexdigest()[:10]}"
    command = stage_command(
        stage, recipe, overrides, datasets=datasets_uri, start_model=start_model_uri, output_dir=output_dir
    )
    (runner or TrainJobRunner()).run(trainjob_manifest(name, command, settings), settings)
    with tempfile.TemporaryDirectory(prefix=f"teleguard-{stage}-") as tmp:
        get_dir(f"{output_dir}/{stage}", tmp)  # verified against the manifest node 0 wrote
        manifest = read_manifest(Path(tmp))
        if manifest is None:
            raise RuntimeError(f"{output_dir}/{stage}: the TrainJob finished without a stage manifest")
        copy_tree(Path(tmp) / manifest["model"], out_model)
        (out_model / "stage-manifest.json").write_text(json.dumps(manifest, indent=2, default=str), "utf-8")
    return {**manifest.get("metrics", {}), "trainjob": name, "nodes": settings.num_nodes}


def rl_stage_step(
    stage: str,
    enabled: bool,
    recipe: str,
    overrides: dict[str, Any],
    datasets: Any,
    start: Any,
    model: Any,
    *,
    num_nodes: int,
    image: str,
    gpu_type: str,
    gpus_per_node: int,
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
) -> str:
    """A GRPO-type stage from a pipeline step (its KFP artifacts in, JSON metrics out): in the step's own pod,
    or on `num_nodes` GPU nodes through a TrainJob."""
    if not enabled or num_nodes <= 1:
        metrics = train_stage_step(
            stage, enabled, recipe, overrides, Path(datasets.path), Path(start.path), Path(model.path)
        )
        return json.dumps(metrics, default=str)
    from teleguard.train.trainjob import TrainJobSettings, current_namespace

    settings = TrainJobSettings(
        namespace=current_namespace(), image=image, num_nodes=num_nodes, gpu_type=gpu_type,
        gpus_per_node=gpus_per_node, node_selector=node_selector, tolerations=tolerations,
    )  # fmt: skip
    metrics = trainjob_stage_step(
        stage, recipe, overrides, datasets_uri=datasets.uri, start_model_uri=start.uri, output_uri=model.uri,
        out_model=Path(model.path), settings=settings,
    )  # fmt: skip
    return json.dumps(metrics, default=str)


def sample_step(
    recipe: str, overrides: dict[str, Any], datasets: Path, model: Path, out_samples: Path
) -> int:
    """Stage 2a, first half: N samples per training prompt; writes rows with their samples."""
    from teleguard.engines import recipe_engine
    from teleguard.train.sampling import generate_samples, read_rows, sampling_params, write_jsonl

    cfg = step_recipe(recipe, overrides, datasets=str(datasets))
    s = cfg.stages.sample
    rows = read_rows(datasets / cfg.data.train_split / "grpo.jsonl", s.limit)
    engine = recipe_engine(cfg, model, datasets, kind=s.engine, batch_size=s.batch_size)
    params = sampling_params(s)
    samples = generate_samples(engine, rows, params, s.batch_size)
    out_samples.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out_samples / "samples.jsonl",
        ({**row, "samples": outs} for row, outs in zip(rows, samples, strict=True)),
    )
    return len(rows)


def select_step(samples: Path, out_selection: Path) -> dict[str, Any]:
    """Stage 2a, second half: keep the shortest correct sample of each prompt; report the unsolved ones."""
    from teleguard.train.sampling import read_rows, write_selection

    rows = read_rows(samples / "samples.jsonl")
    outs = [row.pop("samples") for row in rows]
    return write_selection(rows, outs, out_selection)


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
    from teleguard.demo_serving import pick_calls
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


def teacher_model_step(
    recipe: str, overrides: dict[str, Any], teacher_model_uri: str, datasets: Path, out_model: Path
) -> None:
    """The distillation teacher: a model URI, or the recipe's teacher (built tiny when so configured)."""
    from teleguard.storage import local_copy
    from teleguard.train.stages import Runner

    if teacher_model_uri:
        source = local_copy(teacher_model_uri) if "://" in teacher_model_uri else Path(teacher_model_uri)
        copy_tree(source, out_model)
        return
    with tempfile.TemporaryDirectory(prefix="teleguard-teacher-") as tmp:
        cfg = step_recipe(
            recipe, {**overrides, "stages.distill.teacher.path": str(Path(tmp) / "teacher")},
            datasets=str(datasets), output_dir=tmp,
        )  # fmt: skip
        copy_tree(Runner(cfg, log=print).teacher_model(), out_model)


GATE_FIGURES = (  # (pipeline parameter, figure, at least / at most)
    ("min_live_accuracy", "live_verdict_accuracy", "min"),
    ("max_false_alarm_rate", "live_false_alarm_rate", "max"),
    ("min_live_fraud_type_accuracy", "live_fraud_type_accuracy", "min"),
    ("min_flagged_within_half", "live_flagged_within_half", "min"),
    ("min_well_formed", "well_formed_rate", "min"),
)


def gate_checks(result: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Each threshold against the evaluated figure (live figures: the deployed detector on held-out calls).
    A figure the evaluation did not produce fails its check."""
    figures = {**result.get("live", {}), "well_formed_rate": result.get("well_formed_rate")}
    checks = []
    for parameter, figure, kind in GATE_FIGURES:
        limit = thresholds[parameter]
        value = figures.get(figure)
        ok = value is not None and (value >= limit if kind == "min" else value <= limit)
        checks.append(
            {
                "parameter": parameter,
                "figure": figure,
                "value": value,
                "limit": limit,
                "kind": kind,
                "passed": ok,
            }
        )
    return checks


def register_step(model: Path, registry_uri: str, name: str, metrics: dict[str, Any]) -> str:
    """Put the serving model under `<registry_uri>/<name>/<version>` (local folder or S3, with checksums)."""
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = f"{registry_uri.rstrip('/')}/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="teleguard-register-") as tmp:
        staged = Path(tmp) / "model"
        copy_tree(model, staged)
        (staged / "teleguard-model-card.json").write_text(
            json.dumps({"name": name, "version": version, "metrics": metrics}, indent=2, default=str), "utf-8"
        )
        if "://" in registry_uri:
            from teleguard.storage import put_dir

            put_dir(staged, target)
        else:
            copy_tree(staged, Path(target))
    return target
