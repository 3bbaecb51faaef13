"""The SAFE-QAQ pipeline end to end on KFP's local runner, with CI-sized settings (issue 5).

One run trains every stage a few steps and must stop at the quality gate; a second, with most stages off,
reads its data from an S3 server on loopback (moto), registers the model there and uploads the run's artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teleguard.pipeline import run_local
from teleguard.pipeline_arguments import PipelineArgumentsError, load_arguments
from teleguard.pipeline_summary import STEPS, step_output, summarize_run

from .conftest import TRANSCRIPTS_DIR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CPU_ARGUMENTS = REPO / "recipes" / "safe-qaq" / "pipeline-cpu.yaml"
# a few steps of everything: enough that every stage really runs ms-swift, small enough for CI
SMALL = {
    "stages.sft.max_steps": 3,
    "stages.grpo.max_steps": 1,
    "stages.grpo.per_device_train_batch_size": 4,
    "stages.grpo.max_completion_length": 32,
    "stages.sample.limit": 4,
    "stages.sample.max_tokens": 32,
    "stages.rsft.max_steps": 1,
    "stages.lcrl.max_steps": 1,
    "stages.lcrl.per_device_train_batch_size": 4,
    "stages.lcrl.max_completion_length": 32,
    "stages.realtime.max_steps": 1,
    "stages.realtime.per_device_train_batch_size": 4,
    "stages.realtime.max_completion_length": 32,
    "evaluate.limit": 8,
    "evaluate.max_tokens": 32,
    "model.build_tiny.vocab_size": 1024,
    "model.build_tiny.corpus_limit": 500,
}
TRAINING_STEPS = ("warm-start-sft", "grpo-stage1", "rsft", "lcrl", "realtime-grpo", "export-model")


def _arguments(**extra: object) -> dict[str, object]:
    return load_arguments(
        CPU_ARGUMENTS, {"data_uri": str(TRANSCRIPTS_DIR), "recipe_overrides": SMALL, **extra}
    )


def _artifact(run_dir: Path, step: str, name: str) -> Path:
    """The artifact's path as the step's executor output records it (and it must exist)."""
    out = json.loads((run_dir / step / "executor_output.json").read_text("utf-8"))
    [artifact] = out["artifacts"][name]["artifacts"]
    path = Path(artifact["uri"])
    assert path.exists(), f"{step}.{name}: {path} is missing"
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TRANSCRIPTS_DIR.is_dir():
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    root = tmp_path_factory.mktemp("pipeline")
    # thresholds a model trained for a handful of steps cannot meet: the gate must hold registration back
    arguments = _arguments(registry_uri=str(root / "registry"), min_fraud_accuracy=1.0, min_well_formed=1.0)
    return run_local(arguments, root)


def test_every_stage_leaves_its_artifacts(full_run: Path) -> None:
    assert (_artifact(full_run, "build-data", "calls") / "train" / "calls.jsonl").is_file()
    for split in ("train", "dev", "test"):
        assert (_artifact(full_run, "synthesize-audio", "datasets") / split / "grpo.jsonl").stat().st_size > 0
    for step in ("start-model", *TRAINING_STEPS):
        model = _artifact(full_run, step, "model")
        assert (model / "config.json").is_file() and (model / "model.safetensors").is_file(), step
        assert not (model / "optimizer.pt").exists(), f"{step}: trainer state copied into the model"
    kept = step_output(full_run, "select-shortest-correct")["kept"]
    for step in TRAINING_STEPS[:-1]:  # every stage ran as a stage: none was switched off
        manifest = json.loads((_artifact(full_run, step, "model") / "stage-manifest.json").read_text("utf-8"))
        assert manifest["config_hash"] and manifest["config"]["enabled"], step
        if step == "rsft" and kept == 0:  # a model trained 3 steps solves nothing: RSFT has nothing to learn
            assert manifest["metrics"] == {"rows": 0}
        else:
            assert manifest["metrics"]["global_step/max_steps"].split("/")[0] != "0", step
    assert json.loads((_artifact(full_run, "export-model", "model") / "teleguard-serving.json").read_text())
    samples = _artifact(full_run, "rejection-sampling", "samples") / "samples.jsonl"
    assert len(samples.read_text("utf-8").splitlines()) == SMALL["stages.sample.limit"]
    assert _artifact(full_run, "select-shortest-correct", "selection").is_dir()


def test_evaluation_emits_kfp_metrics_and_reports(full_run: Path) -> None:
    out = json.loads((full_run / "evaluate" / "executor_output.json").read_text("utf-8"))
    figures = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    details = json.loads((_artifact(full_run, "evaluate", "details") / "metrics.json").read_text("utf-8"))
    assert set(details) == {"grpo", "rsft", "lcrl", "final"}
    assert figures["fraud_accuracy"] == round(details["final"]["fraud"]["accuracy"], 4)
    assert figures["well_formed_rate"] == round(details["final"]["well_formed_rate"], 4)
    matrix = out["artifacts"]["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert sum(sum(r["row"]) for r in matrix["rows"]) == details["final"]["fraud"]["n_samples"]
    assert "<html" in _artifact(full_run, "evaluate", "report").read_text("utf-8").lower()
    assert "final" in _artifact(full_run, "evaluate", "report_md").read_text("utf-8")


def test_gate_holds_back_registration_when_thresholds_are_not_met(full_run: Path) -> None:
    summary = summarize_run(full_run)
    assert summary["gate_passed"] is False
    assert summary["registered"] is None and not (full_run / "register-model").exists()
    assert not (full_run.parent / "registry").exists()
    ran = {s["step"] for s in summary["steps"] if s["ran"]}
    assert ran == set(STEPS) - {"register-model"}
    assert summary["evaluation"]["final"]["fraud_accuracy"] == pytest.approx(
        json.loads((full_run / "evaluate" / "details" / "metrics.json").read_text())["final"]["fraud"][
            "accuracy"
        ]
    )


def test_s3_data_registry_and_artifacts(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data read from S3, the gated model registered in S3, and the run's artifacts uploaded there."""
    if not TRANSCRIPTS_DIR.is_dir():
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    from teleguard.storage import open_storage, put_dir

    for name, value in {"S3_ENDPOINT": s3_endpoint, "AWS_ACCESS_KEY_ID": "tg", "AWS_SECRET_ACCESS_KEY": "tg-secret",
                        "TELEGUARD_STORAGE_CACHE": str(tmp_path / "cache")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    data = tmp_path / "data"
    data.mkdir()
    # two of the source files: enough calls for every split, less to ingest
    for source in sorted(TRANSCRIPTS_DIR.glob("*.jsonl"))[:2]:
        (data / source.name).write_bytes(source.read_bytes())
    put_dir(data, "s3://tg-data/dialogues")
    arguments = _arguments(
        data_uri="s3://tg-data/dialogues", registry_uri="s3://tg-registry/models", min_fraud_accuracy=0.0,
        min_well_formed=0.0, run_warm_start_sft=False, run_stage1_grpo=False, run_rsft=False, run_lcrl=False,
        run_realtime=False, compare_stages=False,
    )  # fmt: skip
    run_dir = run_local(arguments, tmp_path / "root", upload_uri="s3://tg-runs/pipeline")
    summary = summarize_run(run_dir)
    assert summary["gate_passed"] is True
    registered = summary["registered"]
    assert registered.startswith("s3://tg-registry/models/teleguard-detector/")
    model = open_storage(registered).local_copy()  # verified against the manifest the upload wrote
    card = json.loads((model / "teleguard-model-card.json").read_text("utf-8"))
    assert card["name"] == "teleguard-detector" and "fraud" in card["metrics"]
    uploaded = open_storage(f"s3://tg-runs/pipeline/{run_dir.name}").local_copy()
    assert (uploaded / "evaluate" / "details" / "metrics.json").is_file()
    assert (uploaded / "export-model" / "model" / "model.safetensors").is_file()


def test_arguments_are_checked_against_the_pipeline(tmp_path: Path) -> None:
    bad = tmp_path / "args.yaml"
    bad.write_text("data_uri: x\ngpu_cout: 2\nuse_audio: 'yes'\nmin_fraud_accuracy: 1\n", "utf-8")
    with pytest.raises(PipelineArgumentsError) as info:
        load_arguments(bad)
    message = str(info.value)
    assert f"{bad}: 'gpu_cout' is not a parameter of the pipeline (did you mean 'gpu_count'?)" in message
    assert f"{bad}: 'use_audio' must be bool, got str 'yes'" in message
    assert "min_fraud_accuracy" not in message  # an int is a fine float
    assert load_arguments(None, {"min_fraud_accuracy": 1}) == {"min_fraud_accuracy": 1.0}

    from teleguard.cli import app

    result = CliRunner().invoke(app, ["pipeline", "run", "--local", "--args", str(bad)])
    assert result.exit_code == 2 and "gpu_cout" in result.output
