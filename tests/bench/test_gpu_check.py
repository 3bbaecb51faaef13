"""The GPU check's CPU dry run, as a user runs it (`make gpu-check DEVICE=cpu`): the same script and code path
a GPU machine runs (a Qwen2-Audio architecture with vLLM's dummy weights behind `teleguard serve --engine
vllm`, live audio calls at growing concurrency, GRPO steps with vLLM and transformers rollouts), with the
architecture at the tiny size vLLM's CPU build runs. It keeps the check from rotting before a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers as tf

from teleguard.tiny_models import QWEN2_AUDIO_7B, write_architecture
from tests.support.paths import REPO


def bench_module(name: str) -> ModuleType:
    """A module of bench/ (scripts, not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: `make setup` installs vLLM's CPU build only where no GPU is present",
    ),
]


def test_make_gpu_check_runs_the_script() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    dry = subprocess.run(["make", "-n", "gpu-check", "DEVICE=cpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "bash bench/gpu_check.sh --device cpu --out gpu-check-cpu.json" in dry


def test_the_real_size_architecture_is_qwen2_audio_7b(tmp_path: Path) -> None:
    model = write_architecture(tmp_path / "7b", ["银行 客服 账户 验证码"] * 20, shape=QWEN2_AUDIO_7B)
    assert not list(model.path.glob("*.safetensors"))  # no weights: vLLM makes up dummy ones
    config = tf.AutoConfig.from_pretrained(model.path)
    with torch.device("meta"):  # shapes only, no memory
        params = sum(p.numel() for p in tf.Qwen2AudioForConditionalGeneration(config).parameters())
    assert 8.3e9 < params < 8.5e9, params  # Qwen2-Audio-7B: 8.4 B parameters
    assert config.architectures == ["Qwen2AudioForConditionalGeneration"]


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "dry-run.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text("utf-8"))
    assert result["ok"] is True and result["machine"]["device"] == "cpu"
    serving = result["serving"]
    assert serving["model"]["weights_files"] == [] and serving["model"]["load_format"] == "dummy"
    levels = serving["levels"]
    assert [lv["concurrent_calls"] for lv in levels] == [1, 2]
    for level in levels:
        # every call streamed its audio and got a verdict; 4 s of audio asks the model every 2 s
        assert level["failed_calls"] == 0 and level["calls_with_verdict"] == level["concurrent_calls"]
        assert level["decisions"] >= 2 * level["concurrent_calls"]
        assert (
            level["decision_latency"]["n"] == level["decisions"] and level["decision_latency"]["p99_ms"] > 0
        )
    largest_within = bench_module("serving_load").largest_within
    assert serving["largest_concurrency_within_p99"] == largest_within(levels, serving["p99_limit_s"])
    # GRPO: the same stage with transformers rollouts and with colocated vLLM rollouts, each step timed
    grpo = result["grpo"]
    assert sorted(r["rollouts"] for r in grpo["runs"]) == ["transformers", "vllm"]
    for run in grpo["runs"]:
        assert run["steps"] == grpo["settings"]["steps"] == 2 and all(s > 0 for s in run["step_s"])
    assert grpo["median_step_s"]["vllm"] > 0 and grpo["vllm_over_transformers"] > 0
    [vllm_run] = [r for r in grpo["runs"] if r["rollouts"] == "vllm"]
    # vLLM generated with the trained policy's weights (synced before each rollout)
    assert vllm_run["rollout_log_ppl_abs_diff"] is not None and vllm_run["rollout_log_ppl_abs_diff"] < 1e-3
