"""Every SAFE-QAQ stage through the real ms-swift on CPU with tiny models; resumption; evaluation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from teleguard.contract import format_answer
from teleguard.data.dataset import build_split
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.data.splits import SPLITS
from teleguard.engines import SwiftEngine
from teleguard.evaluate.run import evaluate_models, read_eval_rows
from teleguard.train.config import load_recipe
from teleguard.train.manifest import read_manifest
from teleguard.train.sampling import read_rows, select, write_jsonl
from teleguard.train.stages import Runner, latest_checkpoint
from tests.support.recipes import QUICK_GRPO, write_recipe

pytestmark = pytest.mark.slow


def test_every_stage_runs_on_cpu_and_is_evaluated(
    tiny_text_model, text_datasets: Path, tmp_path: Path
) -> None:
    stages = {
        "sft": {
            "enabled": True,
            "learning_rate": 1e-3,
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "limit": 8,
        },
        "grpo": QUICK_GRPO,
        "sample": {"engine": "transformers", "num_samples": 2, "max_tokens": 16, "limit": 4},
        "rsft": {"learning_rate": 1e-3, "max_steps": 1, "per_device_train_batch_size": 1},
        # LCRL and real-time GRPO run through the same `Runner.run` as stage 1 and are trained and checked (reward
        # sets, the partial-call data) by the pipeline test, tests/pipeline/test_pipeline_local.py
        "lcrl": {"enabled": False, "use_vllm": False},
        "realtime": {"enabled": False, "use_vllm": False},
    }
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", tiny_text_model, text_datasets, tmp_path / "run", stages)
    )
    results = Runner(recipe, log=lambda _: None).run_all()
    assert [r.stage for r in results] == ["sft", "grpo", "sample", "rsft", "export"]
    for result in results:
        manifest = read_manifest(result.folder)
        assert (
            manifest is not None
            and manifest["stage"] == result.stage
            and (result.model / "config.json").is_file()
        )
        assert manifest["versions"]["ms-swift"] and manifest["wall_seconds"] >= 0
    by_stage = {r.stage: read_manifest(r.folder) for r in results}
    for stage in ("sft", "grpo"):
        assert by_stage[stage]["checkpoint"].startswith("train/checkpoint-")
        assert len(by_stage[stage]["inputs"]["dataset_sha256"]) == 64
    names = set(recipe.stages.grpo.reward_funcs)  # the stage logged the recipe's rewards, each by name
    assert {k.split("/")[1] for k in by_stage["grpo"]["metrics"] if k.startswith("rewards/")} == names
    assert by_stage["grpo"]["inputs"]["dataset"].endswith("grpo.first8.jsonl")  # the stage's row limit
    report = json.loads((tmp_path / "run" / "sample" / "report.json").read_text("utf-8"))
    assert report["prompts"] == 4 and report["kept"] + report["unsolved"] == 4
    assert (tmp_path / "run" / "export" / "model" / "teleguard-serving.json").is_file()

    # a second run finds every stage done and trains nothing
    again = Runner(recipe, log=lambda _: None).run_all()
    assert all(r.skipped for r in again)

    # RSFT trains on what sampling kept: here, reference answers in place of a random model's samples
    rows = read_rows(text_datasets / "train" / "grpo.jsonl", 4)
    references = [[format_answer(r["task"], _label(r["answers"]), think="参考")] for r in rows]
    write_jsonl(tmp_path / "run" / "sample" / "sft.jsonl", select(rows, references).rows)
    rsft = Runner(recipe, force=True, log=lambda _: None).run("rsft")
    assert (
        rsft.manifest["checkpoint"] == "train/checkpoint-1" and rsft.manifest["metrics"]["logged_steps"] >= 1
    )

    # evaluation of two of the stages' models on the held-out split
    eval_rows = read_eval_rows(text_datasets / "test", realtime=True, limit=4)
    models = {"sft": results[0].model, "grpo": results[1].model}
    engines = {
        name: (
            lambda path=path: SwiftEngine(
                path, model_type=tiny_text_model.model_type, template=tiny_text_model.template
            )
        )
        for name, path in models.items()
    }
    metrics = evaluate_models(engines, eval_rows, tmp_path / "eval", max_tokens=16)
    assert set(metrics) == {"sft", "grpo"} and metrics["sft"]["n_outputs"] == 8
    assert "realtime" in metrics["sft"]
    assert (tmp_path / "eval" / "report.md").read_text("utf-8").count("grpo") >= 1
    assert len((tmp_path / "eval" / "predictions-grpo.jsonl").read_text("utf-8").splitlines()) == 8


def _label(answer: str) -> str | bool:
    return {"fraud": True, "normal": False}.get(answer, answer)


def test_killed_stage_resumes_from_its_last_checkpoint(
    tiny_text_model, text_datasets: Path, tmp_path: Path
) -> None:
    stages = {
        "sft": {"enabled": True, "learning_rate": 1e-3, "max_steps": 40, "per_device_train_batch_size": 1},
        "grpo": {"enabled": False, "use_vllm": False},
        "sample": {"enabled": False, "engine": "transformers"},
        "rsft": {"enabled": False},
        "lcrl": {"enabled": False, "use_vllm": False},
        "realtime": {"enabled": False, "use_vllm": False},
        "export": {"enabled": False},
    }
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_text_model, text_datasets, tmp_path / "run", stages)
    recipe_path.write_text(recipe_path.read_text("utf-8").replace("save_steps: 50", "save_steps: 2"), "utf-8")
    train_dir = tmp_path / "run" / "sft" / "train"
    proc = subprocess.Popen(
        [sys.executable, "-m", "teleguard.cli", "train", "sft", "--config", str(recipe_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (
            latest_checkpoint(train_dir) is None or latest_checkpoint(train_dir).name == "checkpoint-2"
        ) and (proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a preempted node: no chance to clean up
        proc.wait()
    saved = latest_checkpoint(train_dir)
    assert saved is not None and read_manifest(tmp_path / "run" / "sft") is None, (
        "the run was not interrupted"
    )
    saved_step = int(saved.name.split("-")[1])
    assert saved_step < 40

    result = Runner(load_recipe(recipe_path), log=lambda _: None).run("sft")
    assert result.manifest["resumed_from"] is not None
    resumed_step = int(result.manifest["resumed_from"].split("-")[-1])
    assert resumed_step >= saved_step and result.manifest["checkpoint"] == "train/checkpoint-40"
    # the resumed run's own log: its first step is the one after the checkpoint, not step 1
    log = (tmp_path / "run" / "sft" / "sft.log").read_text("utf-8")
    steps = [int(n) for n in re.findall(r"'global_step/max_steps': '(\d+)/40'", log)]
    assert steps and min(steps) == resumed_step + 1 and max(steps) == 40


def test_audio_model_sft_and_grpo(tiny_audio_model, tmp_path: Path) -> None:
    from teleguard.data.audio import synthesize_call
    from teleguard.data.audio_clips import ClipWriter

    texts = {
        True: "您好，我是银行客服，您的账户异常，请把验证码告诉我。",
        False: "您好，我想订一份宫保鸡丁外卖。",
    }
    calls = []
    for i in range(4):
        fraud = i % 2 == 0
        turns = (Turn(speaker="left", text=texts[fraud]), Turn(speaker="right", text="好的，请说。"))
        labels = (
            CallLabels(is_fraud=True, fraud_type="银行诈骗")
            if fraud
            else CallLabels(is_fraud=False, scene="外卖服务")
        )
        call = CallRecord(call_id=f"audio/{i}", source="test", turns=turns, labels=labels)
        calls.append(synthesize_call(call, tmp_path / "wav" / f"{i}.wav"))
    datasets = tmp_path / "datasets"
    for name in SPLITS[:1]:
        build_split(calls, datasets / name, modality="audio", clip_maker=ClipWriter(datasets))
    stages = {
        "sft": {"enabled": True, "learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 1},
        "grpo": QUICK_GRPO,
        "sample": {"enabled": False, "engine": "transformers"},
        "rsft": {"enabled": False},
        "lcrl": {"enabled": False, "use_vllm": False},
        "realtime": {"enabled": False, "use_vllm": False},
        "export": {"enabled": False},
    }
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_audio_model, datasets, tmp_path / "run", stages)
    body = yaml.safe_load(recipe_path.read_text("utf-8"))
    body["data"]["modality"] = "audio"
    body["common"]["target_modules"] = ["q_proj", "v_proj"]
    recipe_path.write_text(yaml.safe_dump(body, allow_unicode=True), "utf-8")
    sft, grpo = Runner(load_recipe(recipe_path), log=lambda _: None).run_all()
    assert sft.manifest["checkpoint"] == "train/checkpoint-2" and (grpo.model / "config.json").is_file()
    completions = (grpo.folder / "train" / "completions.jsonl").read_text("utf-8").splitlines()
    row = json.loads(completions[0])
    assert "<audio>" in row["prompt"][0] and "adaptive_classification" in row
