"""Serving benchmark: what the detector server adds to a model call, and decisions per second under load.

    python bench/bench_serving.py [--samples 40] [--max-tokens 16] [--out results.json]

A tiny Qwen3 (built on the spot, tokenizer from the shared transcripts) is served by the real server
(`teleguard.serve.server`, KServe's REST server on uvicorn, loopback) with the transformers engine on CPU.

1. Overhead per chunk, side by side in one run, alternating: (a) the bare engine call for one request (ms-swift's
   blocking `infer` on the very request the server built, no server, no micro-batcher); (b) the round trip of a
   chunk through the server (client send to ack, over the WebSocket and over HTTP) that triggers exactly one
   model call of that request: every sample is a fresh call with the same one-turn chunk, the policy asks only
   the is_fraud round. p50/p99 of each and the ratio server / bare. Also chunks that trigger no model call
   (a policy that never evaluates): pure protocol overhead.
2. Decisions per second as concurrent calls grow (1, 2, 4, 8, 16): each call streams `--turns` one-turn chunks
   over HTTP (each chunk waits for its answer, so each is evaluated); the micro-batcher batches across calls.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.engines.contract import EngineConfig, EngineRequest
from teleguard.engines.swift import SwiftServingEngine
from teleguard.serve.client import CallScript, PlannedChunk, percentile, replay_call, transcript_script
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import ServeConfig, build_server
from teleguard.tiny_models import build_tiny_model, corpus_from_paths

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "teleantifraud-dialogues"
TURN = ("left", "您好，我是工商银行客服，您的账户出现异常交易，需要您配合核实一下身份信息。")


class RecordingEngine:
    """The transformers engine, noting every request the server sends it."""

    def __init__(self, engine: SwiftServingEngine) -> None:
        self.engine = engine
        self.requests: list[EngineRequest] = []

    async def __call__(self, requests: Sequence[EngineRequest]) -> Any:
        self.requests.extend(requests)
        return await self.engine.generate(requests)

    async def aclose(self) -> None:
        await self.engine.aclose()


def ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),  # type: ignore[operator]
        "p99_ms": round(percentile(values, 99) * 1000, 2),  # type: ignore[operator]
        "n": len(values),
    }


def tiny_description(config: dict[str, Any]) -> str:
    return (
        f"tiny Qwen3 built on the spot (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']}), ms-swift transformers engine, float32, greedy"
    )


def one_turn_script() -> CallScript:
    return CallScript(
        (PlannedChunk(2.0, {"segments": [{"speaker": TURN[0], "text": TURN[1], "start": 0.0, "end": 2.0}]}),),
        "bench",
        "transcript",
    )


def call_script(i: int, turns: int) -> CallScript:
    record = CallRecord(
        call_id=f"bench/{i}",
        source="bench",
        turns=tuple(
            Turn(speaker="left" if t % 2 == 0 else "right", text=f"{TURN[1]}（{i}-{t}）")
            for t in range(turns)
        ),
        labels=CallLabels(is_fraud=True),
    )
    return transcript_script(record)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE"):
        os.environ.setdefault(name, "1")

    with tempfile.TemporaryDirectory() as tmp:
        corpus = list(itertools.islice(corpus_from_paths(sorted(args.data.glob("*.jsonl"))), 5000))
        model = build_tiny_model(Path(tmp) / "tiny-qwen3", "qwen3", corpus)
        model_config = json.loads((model.path / "config.json").read_text("utf-8"))
        engine_config = EngineConfig(
            kind="transformers",
            model=str(model.path),
            device="cpu",
            max_tokens=args.max_tokens,
            timeout_s=120,
        )
        recording: dict[str, RecordingEngine] = {}

        def factory(config: EngineConfig) -> RecordingEngine:
            recording["engine"] = RecordingEngine(
                SwiftServingEngine(config.model_copy(update={"model": str(model.path)}))
            )
            return recording["engine"]

        policy = DecisionPolicy(
            every_seconds=None,
            min_turns=1,
            ask_scene="never",
            evaluate_on_close=False,
            max_tokens=args.max_tokens,
            keep_monitoring_after_alert=True,
            max_model_calls=1000,
        )
        config = ServeConfig(
            port=0,
            engine=engine_config,
            policy=policy,
            detector=DetectorConfig(engine_timeout_s=120, max_calls=10_000),
        )
        server = build_server(config, engine_factory=factory, metrics=DetectorMetrics(CollectorRegistry()))
        server.start_in_thread()
        server.wait_ready()
        engine = recording["engine"]
        try:
            # warm up (first generate pays one-off costs), and capture the request one chunk produces
            for transport in ("ws", "http"):
                asyncio.run(replay_call(server.url, one_turn_script(), speed=0, transport=transport))
            request = engine.requests[-1]
            swift = engine.engine
            swift._infer_batch([request])
            bare: list[float] = []
            server_rtt: dict[str, list[float]] = {"ws": [], "http": []}
            for _ in range(args.samples):
                start = time.perf_counter()
                swift._infer_batch([request])
                bare.append(time.perf_counter() - start)
                for transport in ("ws", "http"):
                    before = len(engine.requests)
                    result = asyncio.run(
                        replay_call(server.url, one_turn_script(), speed=0, transport=transport)
                    )
                    assert (
                        len(engine.requests) == before + 1
                        and engine.requests[-1].messages == request.messages
                    )
                    server_rtt[transport].append(result.chunks[0].round_trip_s)  # type: ignore[arg-type]
            tokens = swift._infer_batch([request])[0].tokens

            # throughput: decisions per second as concurrent calls grow
            throughput = []
            for calls in [int(c) for c in args.concurrency.split(",")]:

                async def run(calls: int = calls) -> list[Any]:
                    return list(
                        await asyncio.gather(
                            *(
                                replay_call(
                                    server.url,
                                    call_script(i, args.turns),
                                    speed=0,
                                    transport="http",
                                    timeout=300,
                                )
                                for i in range(calls)
                            )
                        )
                    )

                batches_before = len(engine.engine.batcher.batches)  # type: ignore[union-attr]
                start = time.perf_counter()
                results = asyncio.run(run())
                wall = time.perf_counter() - start
                batches = engine.engine.batcher.batches[batches_before:]  # type: ignore[union-attr]
                decisions = sum(r.evaluations for r in results)
                rtts = [c.round_trip_s for r in results for c in r.chunks]
                throughput.append(
                    {
                        "concurrent_calls": calls,
                        "decisions": decisions,
                        "wall_s": round(wall, 2),
                        "decisions_per_s": round(decisions / wall, 1),
                        "mean_batch": round(sum(batches) / len(batches), 2) if batches else 0,
                        "chunk_round_trip": ms(rtts),
                    }
                )
                print(json.dumps(throughput[-1]))
        finally:
            server.stop()

        # chunks that trigger no model call: a policy that never evaluates
        idle_policy = DecisionPolicy(every_seconds=None, min_turns=1_000_000, evaluate_on_close=False)
        idle = build_server(
            ServeConfig(port=0, policy=idle_policy, detector=DetectorConfig(max_calls=10_000)),
            engine_factory=lambda _c: lambda requests: None,  # never called
            metrics=DetectorMetrics(CollectorRegistry()),
        )
        idle.start_in_thread()
        idle.wait_ready()
        try:
            many = call_script(0, 200)
            # 5 ms between chunks: each ack is back before the next chunk goes (no queueing in the numbers)
            paced = CallScript(
                tuple(PlannedChunk(0.005 * i, c.fields) for i, c in enumerate(many.chunks)),
                "idle",
                "transcript",
            )
            no_model: dict[str, dict[str, float]] = {}
            for transport in ("ws", "http"):
                asyncio.run(replay_call(idle.url, paced, speed=1, transport=transport))  # warm up
                result = asyncio.run(replay_call(idle.url, paced, speed=1, transport=transport))
                no_model[transport] = ms([c.round_trip_s for c in result.chunks])  # type: ignore[misc]
        finally:
            idle.stop()

    bare_ms = ms(bare)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        "model": tiny_description(model_config),
        "max_tokens": args.max_tokens,
        "tokens_generated": tokens,
        "batch_wait_ms": engine_config.batch_wait_ms,
        "one_model_call": {
            "bare_engine": bare_ms,
            "server_ws": ms(server_rtt["ws"]),
            "server_http": ms(server_rtt["http"]),
            "ratio_ws": {q: round(ms(server_rtt["ws"])[q] / bare_ms[q], 2) for q in ("p50_ms", "p99_ms")},
            "ratio_http": {q: round(ms(server_rtt["http"])[q] / bare_ms[q], 2) for q in ("p50_ms", "p99_ms")},
        },
        "no_model_call": no_model,
        "throughput": throughput,
    }
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
