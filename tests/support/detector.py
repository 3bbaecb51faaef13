"""A detector server for tests: scripted engine answers, call scripts, a WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import soundfile as sf
from prometheus_client import CollectorRegistry
from websockets.sync.client import connect

from teleguard.contract import Round, format_answer
from teleguard.engines.contract import EngineConfig, EngineRequest, Generation
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import DetectorServer, ServeConfig, build_server
from teleguard.tiny_models import TinyModel

RATE = 16_000
FRAUD_TYPE = "银行诈骗"
SCENE = "咨询客服"
TURNS = (
    ("left", "您好，我是工商银行客服，您的账户出现异常交易。"),
    ("right", "什么异常？我没有操作过。"),
    ("left", "请您把卡里的钱转到我们的安全账户，并告诉我验证码。"),
    ("right", "好的，我看一下。"),
)

# ------------------------------------------------------------------------------------------------ helpers


def segments(n: int = len(TURNS), seconds: float = 2.0) -> list[list[dict[str, Any]]]:
    """One finished turn per chunk."""
    return [
        [{"speaker": s, "text": t, "start": i * seconds, "end": (i + 1) * seconds}]
        for i, (s, t) in enumerate(TURNS[:n])
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pcm16(seconds: float, channels: int = 1, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-8000, 8000, size=(round(seconds * RATE), channels), dtype="<i2").tobytes()


def wav_b64(seconds: float, rate: int = RATE, channels: int = 1) -> str:
    buf = io.BytesIO()
    sf.write(
        buf,
        np.zeros((round(seconds * rate), channels), dtype=np.float32),
        rate,
        format="WAV",
        subtype="PCM_16",
    )
    return b64(buf.getvalue())


def fraud_answer(is_fraud: bool, confidence: float = 0.9) -> str:
    return format_answer(
        Round.FRAUD, is_fraud, stage="late_stage", reason="r", confidence=confidence, think="t"
    )


class ScriptedEngine:
    """Answers by round: fraud for calls whose id starts with "fraud", else normal. Failures are injected per
    call: `fail[call_id] = n` fails its next n invocations, `slow[call_id] = n` makes them sleep `delay` s."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.fail: dict[str, int] = {}
        self.slow: dict[str, int] = {}
        self.batches: list[list[EngineRequest]] = []
        self.latency: dict[str, float] = {}  # per-call extra latency (the Prometheus test)

    async def __call__(self, requests: Sequence[EngineRequest]) -> list[str | Generation]:
        self.batches.append(list(requests))
        call = requests[0].call_id
        if self.fail.get(call, 0) > 0:
            self.fail[call] -= 1
            raise RuntimeError("injected engine failure")
        if self.slow.get(call, 0) > 0:
            self.slow[call] -= 1
            await asyncio.sleep(10.0)
        await asyncio.sleep(self.latency.get(call, self.delay))
        out: list[str | Generation] = []
        for r in requests:
            if r.round is Round.FRAUD:
                out.append(fraud_answer(r.call_id.startswith("fraud")))
            elif r.round is Round.SCENE:
                out.append(format_answer(Round.SCENE, SCENE, stage="late_stage", confidence=0.8, think="t"))
            else:
                out.append(
                    Generation(
                        format_answer(Round.FRAUD_TYPE, FRAUD_TYPE, stage="late_stage", confidence=0.7), 7
                    )
                )
        return out


@contextmanager
def running(server: DetectorServer) -> Iterator[DetectorServer]:
    server.start_in_thread()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def scripted_server(engine: ScriptedEngine, **detector: Any) -> DetectorServer:
    config = ServeConfig(
        port=0,
        policy=DecisionPolicy(every_seconds=1.0, min_turns=1, ask_scene="until_known", max_tokens=64),
        detector=DetectorConfig(**{"engine_timeout_s": 1.0, "ttl_seconds": 60.0, **detector}),
    )
    return build_server(
        config, engine_factory=lambda _config: engine, metrics=DetectorMetrics(CollectorRegistry())
    )


def ws_url(server: DetectorServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/calls/stream"


class WsCall:
    """A WebSocket client: sends protocol messages and reads answers until the one it waits for."""

    def __init__(self, server: DetectorServer) -> None:
        self.ws = connect(ws_url(server), max_size=None, open_timeout=10)
        self.received: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message, ensure_ascii=False))

    def until(self, kind: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for message in self.received:
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                self.received.remove(message)
                return message
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return message
            self.received.append(message)

    def take(self, kind: str) -> list[dict[str, Any]]:
        taken = [m for m in self.received if m["type"] == kind]
        self.received = [m for m in self.received if m["type"] != kind]
        return taken

    def close(self) -> None:
        self.ws.close()


def stream_ws_call(
    server: DetectorServer,
    call_id: str,
    chunks: list[dict[str, Any]],
    *,
    hold: tuple[int, threading.Event, threading.Event] | None = None,
) -> dict[str, Any]:
    """Open, send every chunk, close; returns acks, decisions and the verdict."""
    client = WsCall(server)
    try:
        client.send({"type": "open", "call_id": call_id})
        assert client.until("opened")["call_id"] == call_id
        acks = []
        for seq, fields in enumerate(chunks):
            if hold is not None and seq == hold[0]:
                hold[1].set()
                assert hold[2].wait(60)  # the call stays open, half streamed, while the test does its part
            client.send({"type": "chunk", "call_id": call_id, "seq": seq, **fields})
            acks.append(client.until("ack", seq=seq))
            time.sleep(0.02)
        client.send({"type": "close", "call_id": call_id, "last_seq": len(chunks) - 1})
        verdict = client.until("verdict")
        return {"acks": acks, "decisions": client.take("decision"), "verdict": verdict}
    finally:
        client.close()


# --------------------------------------------------------------------------------- tiny models, end to end


@contextmanager
def tiny_text_server(model: TinyModel, batch_wait_ms: int) -> Iterator[DetectorServer]:
    """A server on a tiny text model that evaluates every turn, with its own metrics registry."""
    config = ServeConfig(
        model=str(model.path),
        port=0,
        engine=EngineConfig(kind="transformers", device="cpu", max_tokens=8, batch_wait_ms=batch_wait_ms),
        policy=DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="until_known", max_tokens=8),
        detector=DetectorConfig(engine_timeout_s=60.0),
    )
    with running(build_server(config, metrics=DetectorMetrics(CollectorRegistry()))) as server:
        yield server
