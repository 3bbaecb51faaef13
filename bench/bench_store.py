"""Session store benchmark: what keeping calls in Redis costs a chunk, and decisions per second with replicas.

    python bench/bench_store.py [--samples 200] [--calls 16] [--turns 6] [--out results.json]

A real redis-server (Debian's, on a free loopback port, nothing saved to disk) is started for the run.

1. Chunk round trip, in-memory store against the Redis store, side by side in one run (alternating sample by
   sample): two detector servers (`teleguard.serve.server`, KServe's REST server on uvicorn, loopback) in this
   process with an engine that answers at once (scripted), so the figures are the server's and the store's own.
   (a) chunks that trigger no evaluation (sequence check, append, ack), over HTTP and over the WebSocket;
   (b) chunks that trigger one evaluation each (also the lease, reading the call back, storing the decisions),
   over HTTP. p50/p99 of each. Calls of `CALL_CHUNKS` chunks, one after the other (a call's state, and so what
   is read back, grows with it).
2. Decisions per second, 1 replica (in-memory store, then Redis) and 2 replicas sharing Redis: real `teleguard
   serve` processes with the remote engine pointed at a scripted OpenAI-compatible endpoint in this process
   (answers at once: the detector and the store are the limit), `--calls` concurrent calls each streaming
   `--turns` one-turn chunks over HTTP, each chunk evaluated, chunks of a call alternating replicas; the
   median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry
from websockets.sync.client import connect

from teleguard.contract import Round, format_answer
from teleguard.engines.contract import EngineRequest
from teleguard.loopback import LOOPBACK, free_port
from teleguard.serve.client import percentile
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import DetectorServer, ServeConfig, build_server
from teleguard.serve.store import StoreConfig

TEXT = "您好，我是银行客服，您的账户出现异常交易，需要您配合核实一下身份信息。"
ANSWER = format_answer(Round.FRAUD, False, stage="late_stage", reason="r", confidence=0.9)
CALL_CHUNKS = 20


def ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),  # type: ignore[operator]
        "p99_ms": round(percentile(values, 99) * 1000, 2),  # type: ignore[operator]
        "n": len(values),
    }


def segment(i: int) -> list[dict[str, Any]]:
    return [
        {
            "speaker": "left" if i % 2 == 0 else "right",
            "text": f"{TEXT}（{i}）",
            "start": 2.0 * i,
            "end": 2.0 * i + 2,
        }
    ]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server: make system-packages)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def instant(requests: Sequence[EngineRequest]) -> list[str]:
    return [ANSWER for _ in requests]


# --- 1. chunk round trip, in-process servers ----------------------------------------------------------------------


def server(store: str, prefix: str, *, evaluate: bool) -> DetectorServer:
    policy = DecisionPolicy(
        every_seconds=None,
        min_turns=1 if evaluate else 10**9,  # never due: the chunk's own cost only
        ask_scene="never",
        evaluate_on_close=False,
        keep_monitoring_after_alert=True,
        max_model_calls=10**6,
    )
    config = ServeConfig(
        port=0,
        policy=policy,
        detector=DetectorConfig(session_store=store, store=StoreConfig(key_prefix=prefix), ttl_seconds=600),
    )
    built = build_server(
        config, engine_factory=lambda _: instant, metrics=DetectorMetrics(CollectorRegistry())
    )
    built.start_in_thread()
    built.wait_ready()
    return built


def round_trips(redis_url: str, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for evaluate in (False, True):
        servers = {
            "memory": server("memory", "m", evaluate=evaluate),
            "redis": server(redis_url, f"b{evaluate:d}", evaluate=evaluate),
        }
        try:
            clients = {name: httpx.Client(base_url=s.url, timeout=30) for name, s in servers.items()}
            sockets = {
                name: connect(s.url.replace("http://", "ws://") + "/v1/calls/stream", max_size=None)
                for name, s in servers.items()
            }
            times: dict[str, list[float]] = {f"{n}_{t}": [] for n in servers for t in ("http", "ws")}
            transports = ("http",) if evaluate else ("http", "ws")
            for i in range(samples + 10):  # the first 10 warm up
                call, seq = divmod(i, CALL_CHUNKS)
                for name in servers:
                    for transport in transports:
                        call_id = f"{transport}-{call}"
                        if seq == 0:
                            if transport == "http":
                                clients[name].post("/v1/calls", json={"call_id": call_id})
                            else:
                                sockets[name].send(json.dumps({"type": "open", "call_id": call_id}))
                                sockets[name].recv()
                        start = time.perf_counter()
                        if transport == "http":
                            answer = clients[name].post(
                                f"/v1/calls/{call_id}/chunks", json={"seq": seq, "segments": segment(seq)}
                            )
                            assert answer.status_code == 200, answer.text
                            assert bool(answer.json()["decisions"]) is evaluate
                        else:
                            message = {
                                "type": "chunk",
                                "call_id": call_id,
                                "seq": seq,
                                "segments": segment(seq),
                            }
                            sockets[name].send(json.dumps(message))
                            assert json.loads(sockets[name].recv())["type"] == "ack"
                        if i >= 10:
                            times[f"{name}_{transport}"].append(time.perf_counter() - start)
            kind = "evaluated" if evaluate else "no_evaluation"
            for key, values in times.items():
                if values:
                    out[f"{kind}_{key}"] = ms(values)
            for name in servers:
                clients[name].close()
                sockets[name].close()
        finally:
            for s in servers.values():
                s.stop()
    return out


# --- 2. decisions per second with replicas ---------------------------------------------------------------------------


class ScriptedEndpoint:
    """An OpenAI-compatible chat-completions endpoint answering "normal" at once."""

    def __init__(self) -> None:
        body = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": ANSWER}}],
                "usage": {"completion_tokens": 5},
            }
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def start_replicas(
    count: int, store: str, config: Path, workdir: Path
) -> list[tuple[subprocess.Popen[bytes], str]]:
    replicas = []
    for i in range(count):
        port = free_port()
        log = (workdir / f"replica-{store[:5]}-{count}-{i}.log").open("wb")
        command = [
            str(Path(sys.executable).parent / "teleguard"),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--session-store",
            store,
            "--log-level",
            "WARNING",
        ]
        replicas.append(
            (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), f"http://{LOOPBACK}:{port}")
        )
    for process, url in replicas:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "a replica exited"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("a replica did not get ready")
            time.sleep(0.2)
    return replicas


async def stream_calls(urls: list[str], calls: int, turns: int, tag: str) -> tuple[int, float, list[float]]:
    rtts: list[float] = []
    decisions = 0
    limits = httpx.Limits(max_connections=calls * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(c: int) -> int:
            call_id = f"{tag}-{c}"
            made = 0
            assert (
                await http.post(f"{urls[c % len(urls)]}/v1/calls", json={"call_id": call_id})
            ).status_code == 201
            for seq in range(turns):
                url = urls[(c + seq + 1) % len(urls)]
                start = time.perf_counter()
                answer = await http.post(
                    f"{url}/v1/calls/{call_id}/chunks", json={"seq": seq, "segments": segment(seq)}
                )
                rtts.append(time.perf_counter() - start)
                assert answer.status_code == 200, answer.text
                made += sum(d["round"] == "is_fraud" for d in answer.json()["decisions"])
            await http.post(f"{urls[c % len(urls)]}/v1/calls/{call_id}/close", json={"last_seq": turns - 1})
            return made

        start = time.perf_counter()
        decisions = sum(await asyncio.gather(*(one(c) for c in range(calls))))
        wall = time.perf_counter() - start
    return decisions, wall, rtts


def throughput(redis_url: str, calls: int, turns: int, repeats: int, workdir: Path) -> list[dict[str, Any]]:
    endpoint = ScriptedEndpoint()
    config = workdir / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"kind": "remote", "url": endpoint.url, "model": "scripted", "timeout_s": 30, "logprobs": False, "max_concurrency": 64},
        "policy": {"every_seconds": None, "min_turns": 1, "ask_scene": "never", "evaluate_on_close": False, "max_model_calls": 1000},
        "detector": {"engine_timeout_s": 30, "ttl_seconds": 600, "store": {"key_prefix": "bench"}},
    }))  # fmt: skip
    rows = []
    for label, count, store in (
        ("1 replica, in-memory store", 1, "memory"),
        ("1 replica, Redis store", 1, redis_url),
        ("2 replicas, one Redis store", 2, redis_url),
    ):
        replicas = start_replicas(count, store, config, workdir)
        try:
            urls = [url for _, url in replicas]
            asyncio.run(stream_calls(urls, 2, 2, f"warm{count}{store[:1]}"))
            runs = [
                asyncio.run(stream_calls(urls, calls, turns, f"run{r}-{count}{store[:1]}"))
                for r in range(repeats)
            ]
        finally:
            for process, _ in replicas:
                process.terminate()
                process.wait(30)
        # the median run: the machine is shared, single runs are noisy
        rates = sorted(d / w for d, w, _ in runs)
        decisions = runs[0][0]
        rtts = [t for _, _, times in runs for t in times]
        rows.append({"setup": label, "replicas": count, "calls": calls, "decisions_per_run": decisions,
                     "runs": repeats, "decisions_per_s_median": round(rates[len(rates) // 2], 1),
                     "decisions_per_s_all": [round(r, 1) for r in rates], "chunk_round_trip": ms(rtts)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    endpoint.server.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis_url:
        trips = round_trips(redis_url, args.samples)
        print(json.dumps(trips, indent=2), flush=True)
        rows = throughput(redis_url, args.calls, args.turns, args.repeats, Path(tmp))
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work), Python {platform.python_version()}, CPU only",
        "redis": redis_version,
        "chunk_round_trip": trips,
        "decisions_per_second": rows,
    }
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
