"""The detector served end to end on loopback: the real KServe REST server on uvicorn, real clients.

Calls stream over the WebSocket route and the REST routes to tiny models (a text Qwen3 and a Qwen2-Audio, run
by ms-swift's transformers engine) and get decisions and verdicts; KServe's V1 predict and V2 infer answer
protocol messages and single-shot classifications. Bad input of every kind, engine failures and timeouts are
answered with their status and reason while another call keeps streaming and still gets its decisions; those
tests use a scripted engine (answers written with the contract's `format_answer`) so that failures can be
injected at the engine boundary.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry

from teleguard.contract import Round
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.engines.contract import EngineConfig, EngineRequest, Generation
from teleguard.engines.remote import RemoteEngine, openai_messages
from teleguard.engines.wrappers import MicroBatcher
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import DetectorServer, ServeConfig, build_server
from teleguard.storage import resolve_model
from teleguard.tiny_models import TinyModel
from tests.support.detector import (
    FRAUD_TYPE,
    RATE,
    SCENE,
    TURNS,
    ScriptedEngine,
    WsCall,
    b64,
    fraud_answer,
    pcm16,
    running,
    scripted_server,
    segments,
    stream_ws_call,
    tiny_text_server,
    wav_b64,
)


@pytest.fixture(scope="module")
def text_server(tiny_text_model: TinyModel) -> Iterator[DetectorServer]:
    with tiny_text_server(tiny_text_model, batch_wait_ms=20) as server:
        yield server


def test_transcript_calls_over_websocket_and_http_get_decisions_and_verdicts(
    text_server: DetectorServer,
) -> None:
    chunks = [{"segments": s} for s in segments()]
    ws = stream_ws_call(text_server, "ws-call", chunks)
    assert [a["duplicate"] for a in ws["acks"]] == [False] * len(chunks)
    fraud = [d for d in ws["decisions"] if d["round"] == "is_fraud"]
    assert len(fraud) == len(chunks)  # one evaluation per finished turn
    assert [d["audio_time"] for d in fraud] == [2.0, 4.0, 6.0, 8.0]
    assert all(d["call_id"] == "ws-call" and d["latency_s"] > 0 for d in fraud)
    assert ws["verdict"]["call_id"] == "ws-call" and ws["verdict"]["chunks"] == len(chunks)
    assert ws["verdict"]["decisions"] == len(ws["decisions"])
    # the scene and is_fraud rounds of an evaluation went to the model as one batch
    assert 2 in text_server.model.detector.engine.batcher.batches  # type: ignore[union-attr]

    with httpx.Client(base_url=text_server.url, timeout=60) as http:
        opened = http.post("/v1/calls", json={"call_id": "http-call", "language": "zh"})
        assert opened.status_code == 201 and opened.json() == {"call_id": "http-call", "opened": True}
        decisions = []
        for seq, seg in enumerate(segments()):
            answer = http.post("/v1/calls/http-call/chunks", json={"seq": seq, "segments": seg})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["seq"] == seq and not body["duplicate"]
            decisions += body["decisions"]
        # a retried chunk is not counted twice: the same decisions come back
        retry = http.post("/v1/calls/http-call/chunks", json={"seq": 3, "segments": segments()[3]}).json()
        assert retry["duplicate"] and retry["decisions"] == [d for d in decisions if d["seq"] == 3]
        closed = http.post("/v1/calls/http-call/close", json={"last_seq": 3}).json()
        assert closed["verdict"]["chunks"] == 4 and closed["verdict"]["decisions"] == len(decisions)
        assert {d["round"] for d in decisions} >= {"is_fraud"}
        # closing again repeats the verdict
        assert http.post("/v1/calls/http-call/close").json()["verdict"] == closed["verdict"]


def test_kserve_v1_predict_and_v2_infer(text_server: DetectorServer) -> None:
    with httpx.Client(base_url=text_server.url, timeout=60) as http:
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v1/models/teleguard").json() == {"name": "teleguard", "ready": True}
        body = {
            "instances": [
                {"action": "open", "call_id": "v1-call"},
                {"action": "chunk", "call_id": "v1-call", "seq": 0, "segments": segments()[0]},
                {"action": "close", "call_id": "v1-call"},
            ]
        }
        predictions = http.post("/v1/models/teleguard:predict", json=body).json()["predictions"]
        assert [p["action"] for p in predictions] == ["opened", "ack", "verdict"]
        assert predictions[1]["decisions"] and predictions[2]["verdict"]["chunks"] == 1
        # an instance that fails: its error, and what the earlier ones gave
        bad = http.post(
            "/v1/models/teleguard:predict",
            json={
                "instances": [
                    {"action": "open", "call_id": "v1-b"},
                    {"action": "chunk", "call_id": "v1-b", "seq": 5, "segments": segments()[0]},
                ]
            },
        )
        assert bad.status_code == 409 and bad.json()["error"] == "sequence_gap" and bad.json()["index"] == 1
        assert bad.json()["predictions"][0]["action"] == "opened"

        v2 = {
            "id": "req-7",
            "parameters": {"language": "zh"},
            "inputs": [
                {
                    "name": "segments",
                    "datatype": "BYTES",
                    "shape": [len(TURNS)],
                    "data": [json.dumps(s[0], ensure_ascii=False) for s in segments()],
                }
            ],
        }
        answer = http.post("/v2/models/teleguard/infer", json=v2)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["id"] == "req-7" and result["model_name"] == "teleguard"
        outputs = {o["name"]: o for o in result["outputs"]}
        verdict = json.loads(outputs["verdict"]["data"][0])
        assert outputs["is_fraud"]["data"] == [verdict["is_fraud"]] and verdict["audio_seconds"] == 8.0
        assert outputs["decisions"]["shape"][0] >= 1
        unknown = http.post(
            "/v2/models/teleguard/infer",
            json={"inputs": [{"name": "pictures", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        )
        assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_request"


def synthesized_call(tmp_path: Path) -> np.ndarray:
    from teleguard.data.audio import synthesize_call

    record = CallRecord(
        call_id="audio-1",
        source="test",
        turns=tuple(Turn(speaker=s, text=t, start=0.0, end=1.0) for s, t in TURNS[:3]),
        labels=CallLabels(is_fraud=True, scene=SCENE, fraud_type=FRAUD_TYPE),
    )
    call = synthesize_call(record, tmp_path / "call.wav", workers=1)
    audio, rate = sf.read(call.audio, dtype="int16", always_2d=True)
    assert rate == RATE and audio.shape[1] == 2
    return audio


def test_audio_call_over_websocket_gets_decisions(tiny_audio_model: TinyModel, tmp_path: Path) -> None:
    audio = synthesized_call(tmp_path)
    step = RATE  # 1 s chunks of stereo PCM16; the first one as a WAV file
    chunks: list[dict[str, Any]] = []
    for i, start in enumerate(range(0, min(audio.shape[0], 4 * RATE), step)):
        block = audio[start : start + step]
        if i == 0:
            buf = io.BytesIO()
            sf.write(buf, block, RATE, format="WAV", subtype="PCM_16")
            chunks.append({"wav": b64(buf.getvalue())})
        else:
            chunks.append({"audio": b64(block.astype("<i2").tobytes()), "channels": 2})
    config = ServeConfig(
        model=str(tiny_audio_model.path),
        port=0,
        engine=EngineConfig(kind="transformers", device="cpu", max_tokens=6),
        policy=DecisionPolicy(
            every_seconds=2.0, on_turn=False, modality="audio", ask_scene="never", max_tokens=6
        ),
        detector=DetectorConfig(engine_timeout_s=60.0),
    )
    with running(build_server(config, metrics=DetectorMetrics(CollectorRegistry()))) as server:
        result = stream_ws_call(server, "audio-call", chunks)
    fraud = [d for d in result["decisions"] if d["round"] == "is_fraud"]
    seconds = len(chunks) * 1.0 if audio.shape[0] >= 4 * RATE else audio.shape[0] / RATE
    assert fraud and fraud[0]["audio_time"] == pytest.approx(2.0)  # every 2 s of new audio
    assert result["verdict"]["audio_seconds"] == pytest.approx(seconds, abs=1e-3)
    assert all(d["latency_s"] > 0 for d in fraud)


# ----------------------------------------------------------------------- bad input while a call streams


class Streamer(threading.Thread):
    """A well-behaved call streaming over the WebSocket in the background. It sends half its turns, waits
    until `proceed` is set (the test's bad requests happen meanwhile), then sends the rest and closes."""

    def __init__(self, server: DetectorServer, call_id: str, turns: int = 12) -> None:
        super().__init__(daemon=True)
        self.server, self.call_id, self.turns = server, call_id, turns
        self.holding, self.proceed = threading.Event(), threading.Event()

    def start(self) -> None:
        super().start()
        assert self.holding.wait(60), "the streaming call did not get going"
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            chunks = [
                {"segments": [{"speaker": "left", "text": f"第{i}句话", "start": float(i), "end": i + 1.0}]}
                for i in range(self.turns)
            ]
            self.result = stream_ws_call(
                self.server, self.call_id, chunks, hold=(self.turns // 2, self.holding, self.proceed)
            )
        except BaseException as err:
            self.error = err

    def check(self) -> None:
        assert self.is_alive(), "the call was meant to be streaming all along"
        self.proceed.set()
        self.join(60)
        assert self.error is None, self.error
        assert self.result is not None
        fraud = [d for d in self.result["decisions"] if d["round"] == "is_fraud"]
        assert len(fraud) == self.turns and self.result["verdict"]["chunks"] == self.turns


@pytest.fixture
def scripted() -> Iterator[tuple[DetectorServer, ScriptedEngine]]:
    engine = ScriptedEngine(delay=0.01)
    with running(scripted_server(engine, max_calls=4, chunk={"max_audio_bytes": 64_000})) as server:
        yield server, engine


BAD_CHUNKS: list[tuple[str, dict[str, Any], int, str]] = [
    ("invalid base64", {"audio": "not*base64!"}, 400, "invalid_base64"),
    ("wrong sample rate", {"audio": b64(pcm16(0.1)), "sample_rate": 8000}, 400, "wrong_sample_rate"),
    ("wrong sample rate (wav)", {"wav": wav_b64(0.1, rate=8000)}, 400, "wrong_sample_rate"),
    ("wrong channel count", {"audio": b64(pcm16(0.1, 3)), "channels": 3}, 400, "wrong_channels"),
    ("not audio", {"wav": b64(b"this is plainly not a wav file at all")}, 400, "not_audio"),
    ("empty chunk", {}, 400, "empty_chunk"),
    ("oversized payload", {"audio": b64(pcm16(3.0))}, 413, "payload_too_large"),
    ("sequence gap", {"seq": 7, "segments": segments(1)[0]}, 409, "sequence_gap"),
]


def test_bad_input_gets_4xx_while_another_call_keeps_streaming(
    scripted: tuple[DetectorServer, ScriptedEngine],
) -> None:
    server, _engine = scripted
    good = Streamer(server, "good-call")
    good.start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/calls", json={"call_id": "bad"}).status_code == 201
        # chunk 0 accepted, so the out-of-order and gap cases have a position to be wrong about
        assert (
            http.post("/v1/calls/bad/chunks", json={"seq": 0, "segments": segments(1)[0]}).status_code == 200
        )
        for what, fields, status, reason in BAD_CHUNKS:
            answer = http.post("/v1/calls/bad/chunks", json={"seq": 1, **fields})
            assert answer.status_code == status, (what, answer.text)
            body = answer.json()
            assert body["error"] == reason and body["status"] == status and body["message"], what
        conflict = http.post("/v1/calls/bad/chunks", json={"seq": 0, "segments": segments(2)[1]})
        assert conflict.status_code == 409 and conflict.json()["error"] == "out_of_order"
        unknown = http.post("/v1/calls/nobody/chunks", json={"seq": 0, "segments": segments(1)[0]})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_call"
        not_json = http.post(
            "/v1/calls/bad/chunks", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400 and not_json.json()["error"] == "invalid_request"
        huge = http.post("/v1/calls/bad/chunks", content=b"x" * (9 * 1024 * 1024))
        assert huge.status_code == 413 and huge.json()["error"] == "payload_too_large"
        assert http.post("/v1/calls/bad/close").status_code == 200
        closed = http.post("/v1/calls/bad/chunks", json={"seq": 1, "segments": segments(1)[0]})
        assert closed.status_code == 409 and closed.json()["error"] == "closed_call"
        # too many open calls: the good call (held open) and three more fill the 4 places
        for i in range(3):
            assert http.post("/v1/calls", json={"call_id": f"filler-{i}"}).status_code == 201
        full = http.post("/v1/calls", json={"call_id": "one-too-many"})
        assert full.status_code == 429 and full.json()["error"] == "too_many_calls"
        for i in range(3):
            http.post(f"/v1/calls/filler-{i}/close")
        assert http.post("/v1/calls", json={"call_id": "room-again"}).status_code == 201
        http.post("/v1/calls/room-again/close")

    # the same over the WebSocket: an error message, and the socket stays open
    ws = WsCall(server)
    try:
        ws.send({"type": "open", "call_id": "ws-bad"})
        ws.until("opened")
        for what, fields, status, reason in BAD_CHUNKS:
            ws.send({"type": "chunk", "call_id": "ws-bad", "seq": 0, **fields})
            error = ws.until("error")
            assert (error["status"], error["reason"]) == (status, reason), what
        ws.ws.send("{not json")
        assert ws.until("error")["reason"] == "invalid_request"
        ws.send({"type": "dance"})
        assert ws.until("error")["field"] == "type"
        ws.send({"type": "chunk", "call_id": "nobody", "seq": 0, "segments": segments(1)[0]})
        assert ws.until("error")["reason"] == "unknown_call"
        ws.send({"type": "chunk", "call_id": "ws-bad", "seq": 0, "segments": segments(1)[0]})
        assert ws.until("ack", seq=0)["duplicate"] is False
    finally:
        ws.close()
    good.check()
    rejected = server.model.detector.metrics.rejected_requests  # type: ignore[union-attr]
    assert rejected.labels(reason="invalid_base64")._value.get() == 2  # HTTP and WebSocket


def test_engine_failure_and_timeout_answer_503_and_keep_the_call(
    scripted: tuple[DetectorServer, ScriptedEngine],
) -> None:
    server, engine = scripted
    good = Streamer(server, "steady-call")
    good.start()
    metrics = server.model.detector.metrics  # type: ignore[union-attr]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for call, inject, reason in (
            ("fraud-fails", engine.fail, "engine_error"),
            ("fraud-slow", engine.slow, "engine_timeout"),
        ):
            http.post("/v1/calls", json={"call_id": call})
            inject[call] = 1
            first = http.post(f"/v1/calls/{call}/chunks", json={"seq": 0, "segments": segments(1)[0]})
            assert first.status_code == 503, first.text
            body = first.json()
            assert (
                body["error"] == reason
                and body["accepted"] is True
                and body["seq"] == 0
                and body["retryable"]
            )
            # the chunk was kept: resending it is a retry, and now it is evaluated
            retry = http.post(f"/v1/calls/{call}/chunks", json={"seq": 0, "segments": segments(1)[0]})
            assert retry.status_code == 200, retry.text
            again = retry.json()
            assert again["duplicate"] and [d["round"] for d in again["decisions"]] == [
                "scene",
                "is_fraud",
                "fraud_type",
            ]
            assert again["decisions"][1]["alert"] and again["decisions"][1]["audio_time"] == 2.0
            verdict = http.post(f"/v1/calls/{call}/close").json()["verdict"]
            assert verdict["is_fraud"] and verdict["fraud_type"] == FRAUD_TYPE and verdict["chunks"] == 1
    good.check()
    assert metrics.engine_errors.labels(kind="error")._value.get() == 1
    assert metrics.engine_errors.labels(kind="timeout")._value.get() == 1


def test_idle_calls_expire_after_the_ttl() -> None:
    engine = ScriptedEngine()
    with (
        running(scripted_server(engine, ttl_seconds=0.4, sweep_seconds=0.1)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        metrics = server.model.detector.metrics  # type: ignore[union-attr]
        http.post("/v1/calls", json={"call_id": "fraud-idle"})
        http.post("/v1/calls/fraud-idle/chunks", json={"seq": 0, "segments": segments(1)[0]})
        assert metrics.active_calls._value.get() == 1
        deadline = time.monotonic() + 10
        while metrics.calls_expired._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.calls_expired._value.get() == 1 and metrics.active_calls._value.get() == 0
        assert metrics.calls_completed.labels(verdict="fraud")._value.get() == 1
        late = http.post("/v1/calls/fraud-idle/chunks", json={"seq": 1, "segments": segments(2)[1]})
        assert late.status_code == 404 and late.json()["error"] == "unknown_call"


class RecordedErrors(logging.Handler):
    """The error records of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_readiness_is_false_until_the_model_is_loaded_and_shutdown_drains() -> None:
    loaded = threading.Event()
    engine = ScriptedEngine(delay=0.6)

    def slow_factory(_config: EngineConfig) -> ScriptedEngine:
        loaded.wait(30)
        return engine

    config = ServeConfig(port=0, policy=DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never"))
    server = build_server(config, engine_factory=slow_factory, metrics=DetectorMetrics(CollectorRegistry()))
    errors = RecordedErrors()
    logging.getLogger("kserve").addHandler(errors)  # KServe's logger does not propagate to pytest's capture
    server.start_in_thread()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200
            for _ in range(3):  # probes ask again and again while a model loads
                not_ready = http.get("/v2/health/ready")
                assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
            assert http.get("/v1/models/teleguard").status_code == 503
            assert errors.records == [], "a not-ready answer was logged as an error"
            early = http.post("/v1/calls", json={"call_id": "early"})
            assert early.status_code == 503 and early.json()["error"] == "not_ready"
            loaded.set()
            server.wait_ready()
            assert http.get("/v2/health/ready").json() == {"ready": True}
            http.post("/v1/calls", json={"call_id": "drained"})
            # a decision in flight when shutdown starts is still delivered
            answers: list[httpx.Response] = []
            sender = threading.Thread(
                target=lambda: answers.append(
                    http.post("/v1/calls/drained/chunks", json={"seq": 0, "segments": segments(1)[0]})
                )
            )
            sender.start()
            time.sleep(0.2)
            server.stop()
            sender.join(10)
            assert answers and answers[0].status_code == 200 and answers[0].json()["decisions"]
    finally:
        logging.getLogger("kserve").removeHandler(errors)
        server.stop()


# ------------------------------------------------------------------------------------------ engines, units


def test_micro_batcher_batches_concurrent_calls_into_one_engine_call() -> None:
    seen: list[list[str]] = []

    def batch(requests: list[EngineRequest]) -> list[Generation]:
        seen.append([r.call_id for r in requests])
        time.sleep(0.05)
        return [Generation(f"answer {r.call_id}", 3) for r in requests]

    async def main() -> list[list[Generation]]:
        batcher = MicroBatcher(batch, max_batch_size=8, wait_ms=20)
        requests = [EngineRequest(f"c{i}", Round.FRAUD, [{"role": "user", "content": "x"}]) for i in range(5)]
        try:
            return await asyncio.gather(*(batcher.generate([r]) for r in requests))
        finally:
            await batcher.aclose()

    answers = asyncio.run(main())
    assert [a[0].text for a in answers] == [f"answer c{i}" for i in range(5)]
    assert seen == [[f"c{i}" for i in range(5)]]  # one engine call for five concurrent calls


def test_remote_engine_speaks_openai_chat_completions_with_audio_parts() -> None:
    app = FastAPI()
    bodies: list[dict[str, Any]] = []

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> Any:
        body = await request.json()
        bodies.append(body)
        if body["max_tokens"] == 1:
            await asyncio.sleep(0.6)
        return {
            "choices": [{"message": {"role": "assistant", "content": fraud_answer(True)}}],
            "usage": {"completion_tokens": 9},
        }

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    clip = np.zeros((RATE, 2), dtype=np.float32)
    request = EngineRequest(
        "c1",
        Round.FRAUD,
        [{"role": "system", "content": "s"}, {"role": "user", "content": "<audio>听这段通话"}],
        (clip,),
        64,
    )
    try:
        from teleguard.engines.contract import EngineTimeout

        async def main() -> None:
            engine = RemoteEngine(
                EngineConfig(kind="remote", url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.2)
            )
            try:
                [answer] = await engine.generate([request])
                assert answer.tokens == 9 and "is_fraud" in answer.text
                with pytest.raises(EngineTimeout):
                    await engine.generate(
                        [EngineRequest("c1", Round.FRAUD, [{"role": "user", "content": "x"}], (), 1)]
                    )
            finally:
                await engine.aclose()

        asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(10)
    user = bodies[0]["messages"][1]["content"]
    assert user[0]["type"] == "input_audio" and user[0]["input_audio"]["format"] == "wav"
    data, rate = sf.read(io.BytesIO(base64.b64decode(user[0]["input_audio"]["data"])))
    assert rate == RATE and data.shape == (RATE, 2)
    assert user[1] == {"type": "text", "text": "听这段通话"} and bodies[0]["model"] == "m"
    assert openai_messages(request)[0] == {"role": "system", "content": "s"}


def test_engine_config_is_validated() -> None:
    with pytest.raises(ValueError, match="url"):
        EngineConfig(kind="remote", model="m")
    assert EngineConfig(kind="vllm", device="cpu", model="/m").device == "cpu"  # vLLM's CPU build
    with pytest.raises(ValueError, match="remote engine only"):
        EngineConfig(kind="transformers", url="http://x/v1")


def test_model_location_local_storage_initializer_and_s3(
    tiny_text_model: TinyModel, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(str(tiny_text_model.path)) == tiny_text_model.path
    mount = tmp_path / "mnt-models"
    (mount / "model").mkdir(parents=True)
    for f in tiny_text_model.path.iterdir():
        (mount / "model" / f.name).write_bytes(f.read_bytes())
    assert resolve_model(None, mount=str(mount)) == mount / "model"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))

    from teleguard.storage import put_dir

    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("TELEGUARD_STORAGE_CACHE", str(tmp_path / "cache"))
    put_dir(tiny_text_model.path, "s3://models/tiny")
    local = resolve_model("s3://models/tiny")
    assert (local / "config.json").read_bytes() == (tiny_text_model.path / "config.json").read_bytes()


def test_serve_config_from_yaml_and_command_line(tmp_path: Path) -> None:
    from teleguard.serve.cli import ServeConfigError, load_serve_config

    file = tmp_path / "serve.yaml"
    file.write_text(
        "port: 9000\nengine: {kind: remote, url: 'http://127.0.0.1:1/v1', model: m}\npolicy: {language: en}\n"
    )
    config = load_serve_config(
        file, {"port": 9001, "engine.timeout_s": 2.5, "detector.max_calls": 7, "host": None}
    )
    assert (config.port, config.host, config.engine.kind, config.engine.timeout_s) == (
        9001,
        "127.0.0.1",
        "remote",
        2.5,
    )
    assert config.policy.language == "en" and config.detector.max_calls == 7
    with pytest.raises(ServeConfigError, match=r"field .engine.: url must start with http"):
        load_serve_config(file, {"engine.url": "ftp://x"})
