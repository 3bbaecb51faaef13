"""The vllm engine against the transformers engine, as a user meets them: `teleguard serve` with each, the same
tiny model, the same calls, decisions per second and decision latency as concurrent calls grow.

    python bench/bench_engines.py [--levels 1,4,16,64] [--turns 4] [--max-tokens 16] [--out results.json]

A tiny Qwen3 with 64-wide heads (`teleguard.tiny_models.VLLM_TINY_SIZE`, the smallest vLLM's CPU build runs) is
built on the spot; two servers start as subprocesses (`teleguard serve --config`, one per engine, CPU). At each
level both serve the same number of concurrent transcript calls over HTTP, one after the other (the order
alternates per level), every chunk sent as soon as the previous one was answered and each finished turn asking
the is_fraud round. Reported per engine and level: decisions/s, decision latency p50/p99 (client side, from
the chunk's send to its decision), and the ratios vllm / transformers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from serving_load import run_level, transcript_call

from teleguard.loopback import free_port
from teleguard.serve.process import serving
from teleguard.tiny_models import VLLM_TINY_SIZE, build_tiny_model, corpus_from_paths

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "teleantifraud-dialogues"
ENGINES = ("vllm", "transformers")


def serve_config(model: Path, engine: str, max_tokens: int) -> dict[str, Any]:
    return {
        "name": "teleguard",
        "model": str(model),
        "host": "127.0.0.1",
        "port": free_port(),
        "engine": {"kind": engine, "device": "cpu", "timeout_s": 300, "max_tokens": max_tokens},
        "policy": {
            "every_seconds": None,
            "on_turn": True,
            "min_turns": 1,
            "ask_scene": "never",
            "keep_monitoring_after_alert": True,
            "evaluate_on_close": False,
            "max_model_calls": 1000,
            "max_tokens": max_tokens,
        },
        "detector": {"engine_timeout_s": 300, "max_calls": 10_000, "drain_seconds": 5},
        "grace_seconds": 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    levels = [int(n) for n in args.levels.split(",")]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        corpus = list(itertools.islice(corpus_from_paths(sorted(args.data.glob("*.jsonl"))), 5000))
        model = build_tiny_model(Path(tmp) / "tiny-qwen3", "qwen3", corpus, **VLLM_TINY_SIZE)
        servers = {
            engine: stack.enter_context(
                serving(serve_config(model.path, engine, args.max_tokens), Path(tmp) / f"serve-{engine}")
            )
            for engine in ENGINES
        }
        ready = {engine: round(server.wait_ready(600), 1) for engine, server in servers.items()}
        first = 0
        for server in servers.values():  # warm-up, not counted
            run_level(server.url, 2, lambda i: transcript_call(i, 2), speed=0, timeout=300, first=first)
            first += 2
        for n, calls in enumerate(levels):
            order = ENGINES if n % 2 == 0 else ENGINES[::-1]
            row: dict[str, Any] = {"concurrent_calls": calls}
            for engine in order:
                level = run_level(
                    servers[engine].url,
                    calls,
                    lambda i: transcript_call(i, args.turns),
                    speed=0,
                    timeout=600,
                    first=first,
                )
                first += calls
                row[engine] = level
            row["ratio_vllm_to_transformers"] = {
                "decisions_per_s": round(row["vllm"]["decisions_per_s"] / row["transformers"]["decisions_per_s"], 2),
                "p50": round(row["vllm"]["decision_latency"]["p50_ms"] / row["transformers"]["decision_latency"]["p50_ms"], 2),
                "p99": round(row["vllm"]["decision_latency"]["p99_ms"] / row["transformers"]["decision_latency"]["p99_ms"], 2),
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
        config = json.loads((model.path / "config.json").read_text("utf-8"))

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        "model": (
            f"tiny Qwen3 built on the spot (hidden {config['hidden_size']}, heads {config['head_dim']} wide, "
            f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']}), float32"
        ),
        "calls": f"{args.turns} transcript turns each, the is_fraud round after every turn, over HTTP",
        "max_tokens": args.max_tokens,
        "ready_s": ready,
        "levels": rows,
    }
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
