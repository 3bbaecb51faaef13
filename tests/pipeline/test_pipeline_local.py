"""The SAFE-QAQ pipeline end to end on KFP's local runner, with CI-sized settings (issues 5 and 12).

One run goes the README's way: the command `make demo` runs, through the installed `teleguard` entry point as a
subprocess, with the CI-sized arguments file `recipes/safe-qaq/pipeline-ci.yaml` in place of the CPU one. It
trains every stage a few steps, must stop at the quality gate, and ends with the summary and the serving demo;
the tests of its artifacts share it. A second run, in process with most stages off, reads its data from an S3
server on loopback (moto), registers the model there and uploads the run's artifacts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from teleguard.contract import load_prompts
from teleguard.pipeline.arguments import PipelineArgumentsError, load_arguments, pipeline_parameters
from teleguard.pipeline.local import run_local
from teleguard.pipeline.progress import LOGS_DIR, TIMES_FILE
from teleguard.pipeline.registry import pipeline_info
from teleguard.pipeline.summary import step_output, summarize_run
from teleguard.serve.profile import PROMPTS_FILE, read_profile
from tests.support.paths import REPO, TRANSCRIPTS_DIR
from tests.support.processes import wait_ready

pytestmark = pytest.mark.slow

CPU_ARGUMENTS = REPO / "recipes" / "safe-qaq" / "pipeline-cpu.yaml"
# the CPU file with a few steps of everything: every stage really runs ms-swift, small enough for CI
CI_ARGUMENTS = REPO / "recipes" / "safe-qaq" / "pipeline-ci.yaml"
SMALL = yaml.safe_load(CI_ARGUMENTS.read_text("utf-8"))["recipe_overrides"]
STEPS = pipeline_info("safe-qaq").steps()
TRAINING_STEPS = ("warm-start-sft", "grpo-stage1", "rsft", "lcrl", "realtime-grpo", "export-model")
MAX_CONSOLE_LINES = 200  # the console is for a person: progress, summary, serving demo


def _arguments(**extra: object) -> dict[str, object]:
    return load_arguments(CI_ARGUMENTS, {"data_uri": str(TRANSCRIPTS_DIR), **extra})


def _artifact(run_dir: Path, step: str, name: str) -> Path:
    """The artifact's path as the step's executor output records it (and it must exist)."""
    out = json.loads((run_dir / step / "executor_output.json").read_text("utf-8"))
    [artifact] = out["artifacts"][name]["artifacts"]
    path = Path(artifact["uri"])
    assert path.exists(), f"{step}.{name}: {path} is missing"
    return path


def make_demo_command(data: Path) -> list[str]:
    """The command `make demo DATA=data` runs (its `teleguard pipeline run` line under `make -n`), as a list.

    Under `make test` (CI) this runs inside make: without the parent's MAKEFLAGS/MAKELEVEL the dry run prints
    no "Entering directory" lines and starts no jobserver."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    }
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", f"DATA={data}"], cwd=REPO, capture_output=True, text=True,
        check=True, env=env,
    )  # fmt: skip
    [line] = [line for line in dry.stdout.splitlines() if " pipeline run --local " in line]
    return shlex.split(line)


@dataclass
class CliRun:
    command: list[str]
    returncode: int
    output: str  # stdout and stderr as the console got them
    run_dir: Path
    registry: Path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    if not TRANSCRIPTS_DIR.is_dir():
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    root = tmp_path_factory.mktemp("pipeline")
    command = make_demo_command(TRANSCRIPTS_DIR)
    args = command.index("--args")
    assert command[args + 1] == "recipes/safe-qaq/pipeline-cpu.yaml", command
    command[args + 1] = str(CI_ARGUMENTS.relative_to(REPO))
    command[0] = str(Path(sys.executable).parent / "teleguard")  # this environment's entry point
    # a threshold a model trained for a handful of steps cannot meet (every answer well-formed): the gate must
    # hold registration back, and the serving demo then serves the exported model, saying so
    command += [
        "--root", str(root / "pipeline"), "--arg", f"registry_uri={root / 'registry'}",
        "--arg", "min_well_formed=1.0",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, "COLUMNS": "120"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=1800, check=False,
    )  # fmt: skip
    runs = list((root / "pipeline").iterdir()) if (root / "pipeline").is_dir() else []
    assert len(runs) == 1, f"exit code {result.returncode}, no run folder:\n{result.stdout[-4000:]}"
    return CliRun(command, result.returncode, result.stdout, runs[0], root / "registry")


@pytest.fixture(scope="module")
def full_run(cli_run: CliRun) -> Path:
    return cli_run.run_dir


def test_main_command_through_the_cli(cli_run: CliRun) -> None:
    """`make demo`'s command, CI-sized: exit 0, a short console with a line per step, the summary, the serving
    demo, and every step's full log under the run folder."""
    output, run_dir = cli_run.output, cli_run.run_dir
    lines = output.splitlines()
    assert cli_run.returncode == 0, output[-4000:]
    assert len(lines) < MAX_CONSOLE_LINES, f"{len(lines)} console lines:\n{output}"
    assert "executorInput" not in output and "Executing task" not in output  # the runner's dumps stay in logs
    ran = [step for step in STEPS if step != "register-model"]
    for step in ran:  # its progress: started, then done
        assert any(line.split()[1:3] == [step, "done"] for line in lines), step
    logs = run_dir / LOGS_DIR
    assert f"step logs: {logs}/<step>.log" in output
    for step in ran:
        text = (logs / f"{step}.log").read_text("utf-8")
        assert f"Task '{step}' finished with status SUCCESS" in text, step
    assert "[KFP Executor" in (logs / "warm-start-sft.log").read_text("utf-8")
    times = json.loads((logs / TIMES_FILE).read_text("utf-8"))
    assert all(times[step]["status"] == "done" and times[step]["seconds"] > 0 for step in ran)
    assert times["register-model"]["status"] == "not run"
    # the summary
    assert "teleguard SAFE-QAQ (KFP local runner)" in output
    assert "offline evaluation on the held-out split" in output and "quality gate: failed" in output
    assert f"report: {run_dir / 'evaluate' / 'details' / 'report.md'}" in output
    # the live evaluation: the exported model through the detector, next to the baseline, every round named
    assert "live evaluation: the deployed detector on 8 held-out calls" in output
    assert "TF-IDF + LR baseline" in output
    for figure in ("verdict accuracy", "false alarms on normal calls", "fraud type: accuracy", "scene: accuracy",
                   "time to detection", "first 50 %", "decision latency p99"):  # fmt: skip
        assert figure in output, figure
    # the gate decided on the live figures, and says which check failed (well-formed 1.0 cannot be met)
    assert "FAIL well_formed_rate" in output and "live_verdict_accuracy" in output
    # the serving demo: the exported model (the gate failed), decisions, verdicts, the server's counters
    assert "serving the export step's model instead" in output
    assert "live decisions on held-out calls (teleguard serve)" in output
    assert "server /metrics:" in output and "fraud rate" in output
    demo = json.loads((run_dir / "serve-demo" / "serve-demo.json").read_text("utf-8"))
    assert len(demo["calls"]) == 4 and demo["server_exit_code"] in (0, -15)


def test_serve_and_stream_as_the_readme_shows(cli_run: CliRun, tmp_path: Path) -> None:
    """The README's serving commands, as subprocesses: `teleguard serve --model <the trained model>` (nothing
    else: the model folder's serving profile says how to ask it), then `teleguard stream` of a held-out call
    record (`--index 3 --speed 10`, WebSocket) and of a shared dialogue file by call id (`--speed 0 --http`)."""
    import signal

    from teleguard.loopback import free_port

    teleguard = str(Path(sys.executable).parent / "teleguard")
    model = cli_run.run_dir / "export-model" / "model"  # the gate held registration back: the exported model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [teleguard, "serve", "--model", str(model), "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_ready(url, server, log)
        calls = cli_run.run_dir / "build-data" / "calls" / "test" / "calls.jsonl"
        fraud_file = next(p for p in sorted(TRANSCRIPTS_DIR.glob("fraud_dialogues-*.jsonl")) if "tts_fraud_00079" in p.read_text("utf-8"))  # fmt: skip
        for args, call in (
            ([str(calls), "--index", "3", "--speed", "10"], None),
            ([str(fraud_file), "--call-id", "tts_fraud_00079", "--speed", "0", "--http"], "tts_fraud_00079"),
        ):
            result = subprocess.run(
                [teleguard, "stream", *args, "--url", url], cwd=REPO, capture_output=True, text=True,
                timeout=300, check=False,
            )  # fmt: skip
            output = result.stdout + result.stderr
            assert result.returncode == 0, output
            assert "streaming transcript" in output and "verdict for" in output, output
            if call:
                assert f"{fraud_file.stem}/{call}" in output
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert f"serving profile {model / 'teleguard-serving.yaml'}" in log.read_text("utf-8")


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
        if step in ("grpo-stage1", "lcrl", "realtime-grpo"):  # each GRPO stage logged its own reward set
            logged = {k.split("/")[1] for k in manifest["metrics"] if k.startswith("rewards/")}
            assert logged == set(manifest["config"]["reward_funcs"]), step
    realtime = json.loads(
        (_artifact(full_run, "realtime-grpo", "model") / "stage-manifest.json").read_text("utf-8")
    )
    assert Path(realtime["inputs"]["dataset"]).name.startswith("realtime."), "stage 3 trains on partial calls"
    exported = _artifact(full_run, "export-model", "model")
    assert json.loads((exported / "teleguard-serving.json").read_text())
    # the serving profile: the CI recipe's answer length and the data build's window and prompts
    profile = read_profile(exported)
    assert (
        profile is not None
        and profile.policy["max_tokens"] == 32
        and profile.policy["max_transcript_chars"] == 160
    )
    assert load_prompts(exported / PROMPTS_FILE) == load_prompts(
        REPO / "recipes" / "safe-qaq" / "prompts-cpu-zh.yaml"
    )
    samples = _artifact(full_run, "rejection-sampling", "samples") / "samples.jsonl"
    assert len(samples.read_text("utf-8").splitlines()) == SMALL["stages.sample.limit"]
    assert _artifact(full_run, "select-shortest-correct", "selection").is_dir()


def test_evaluation_emits_kfp_metrics_and_reports(full_run: Path) -> None:
    out = json.loads((full_run / "evaluate" / "executor_output.json").read_text("utf-8"))
    figures = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    details = json.loads((_artifact(full_run, "evaluate", "details") / "metrics.json").read_text("utf-8"))
    assert set(details) == {"final", "baseline"}  # compare_stages: false (the main job's arguments)
    assert figures["fraud_accuracy"] == round(details["final"]["fraud"]["accuracy"], 4)
    # the live figures of the deployed model, from a replay of 8 held-out calls with its serving profile
    live = details["final"]["live"]
    assert live["live_calls"] == 8 and figures["live_verdict_accuracy"] == round(
        live["live_verdict_accuracy"], 4
    )
    results = (_artifact(full_run, "evaluate", "details") / "live" / "live-results.jsonl").read_text("utf-8")
    assert len(results.splitlines()) == 8
    assert (
        details["baseline"]["baseline_live_calls"] == 8
        and "baseline_offline_fraud_accuracy" in details["baseline"]
    )
    report = _artifact(full_run, "evaluate", "report_md").read_text("utf-8")
    assert "The deployed detector, live on held-out calls" in report
    assert figures["well_formed_rate"] == round(details["final"]["well_formed_rate"], 4)
    matrix = out["artifacts"]["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert sum(sum(r["row"]) for r in matrix["rows"]) == details["final"]["fraud"]["n_samples"]
    assert "<html" in _artifact(full_run, "evaluate", "report").read_text("utf-8").lower()
    assert "final" in _artifact(full_run, "evaluate", "report_md").read_text("utf-8")


def test_gate_holds_back_registration_when_thresholds_are_not_met(cli_run: CliRun) -> None:
    full_run = cli_run.run_dir
    summary = summarize_run(full_run, STEPS)
    assert summary["gate_passed"] is False
    assert summary["registered"] is None and not (full_run / "register-model").exists()
    assert not cli_run.registry.exists()
    ran = {s["step"] for s in summary["steps"] if s["ran"]}
    assert ran == set(STEPS) - {"register-model"}
    assert all(s["seconds"] for s in summary["steps"] if s["ran"])
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
    # two of the source files, a fraud one and the normal one: both labels in every split, less to ingest
    sources = sorted(TRANSCRIPTS_DIR.glob("fraud_*.jsonl"))[:1] + sorted(
        TRANSCRIPTS_DIR.glob("normal_*.jsonl")
    )
    for source in sources:
        (data / source.name).write_bytes(source.read_bytes())
    put_dir(data, "s3://tg-data/dialogues")
    # every gate threshold wide open, whatever the gate looks at: the untrained model must be registered
    gate_open = {name: 0.0 if name.startswith("min_") else 1.0 for name, p in pipeline_parameters().items()
                 if name.startswith(("min_", "max_")) and p.annotation is float}  # fmt: skip
    arguments = _arguments(
        data_uri="s3://tg-data/dialogues", registry_uri="s3://tg-registry/models", **gate_open,
        run_warm_start_sft=False, run_stage1_grpo=False, run_rsft=False, run_lcrl=False, run_realtime=False,
        compare_stages=False,
    )  # fmt: skip
    run_dir = run_local(arguments, tmp_path / "root", upload_uri="s3://tg-runs/pipeline")
    summary = summarize_run(run_dir, STEPS)
    # RSFT off: its rejection sampling loaded no model and sampled nothing
    assert (_artifact(run_dir, "rejection-sampling", "samples") / "samples.jsonl").read_text("utf-8") == ""
    assert summary["gate_passed"] is True
    registered = summary["registered"]
    assert registered.startswith("s3://tg-registry/models/teleguard-detector/")
    model = open_storage(registered).local_copy()  # verified against the manifest the upload wrote
    card = json.loads((model / "teleguard-model-card.json").read_text("utf-8"))
    assert card["name"] == "teleguard-detector" and "fraud" in card["metrics"]
    uploaded = open_storage(f"s3://tg-runs/pipeline/{run_dir.name}").local_copy()
    assert (uploaded / "evaluate" / "details" / "metrics.json").is_file()
    assert (uploaded / LOGS_DIR / "evaluate.log").is_file()  # the logs travel with the artifacts
    assert (uploaded / "export-model" / "model" / "model.safetensors").is_file()


def test_arguments_are_checked_against_the_pipeline(tmp_path: Path) -> None:
    bad = tmp_path / "args.yaml"
    bad.write_text("data_uri: x\ngpu_cout: 2\nuse_audio: 'yes'\nmin_well_formed: 1\n", "utf-8")
    with pytest.raises(PipelineArgumentsError) as info:
        load_arguments(bad)
    message = str(info.value)
    assert f"{bad}: 'gpu_cout' is not a parameter of the pipeline (did you mean 'gpu_count'?)" in message
    assert f"{bad}: 'use_audio' must be bool, got str 'yes'" in message
    assert "min_well_formed" not in message  # an int is a fine float
    assert load_arguments(None, {"min_well_formed": 1}) == {"min_well_formed": 1.0}

    from teleguard.cli import app

    result = CliRunner().invoke(app, ["pipeline", "run", "--local", "--args", str(bad)])
    assert result.exit_code == 2 and "gpu_cout" in result.output
