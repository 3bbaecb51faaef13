"""`teleguard stream` and `teleguard.serve.client` end to end on loopback, against real servers with tiny models.

A transcript call (a teleguard call record, a TeleAntiFraud dialogue file) goes to a server running a tiny
text Qwen3, an espeak-ng call synthesized with `teleguard.data.audio.synthesize_call` to one running a tiny
Qwen2-Audio, each over the WebSocket and the REST routes; decisions are printed as they arrive and the verdict
comes back. A bad URL and a refused open (409) end the command with exit code 1 and the server's message.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from teleguard.cli import app
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.engines.contract import EngineConfig
from teleguard.serve.client import (
    CallSourceError,
    StreamError,
    load_call,
    load_record,
    replay_call,
    transcript_script,
)
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import DetectorServer, ServeConfig, build_server
from teleguard.tiny_models import TinyModel
from tests.support.detector import TURNS, running, tiny_text_server

runner = CliRunner()


def record(call_id: str = "calls/fraud-7", turns: int = 4) -> CallRecord:
    return CallRecord(
        call_id=call_id,
        source="test",
        turns=tuple(Turn(speaker=s, text=t) for s, t in TURNS[:turns]),  # untimed: times are estimated
        labels=CallLabels(is_fraud=True, fraud_type="银行诈骗"),
    )


@pytest.fixture(scope="module")
def text_server(tiny_text_model: TinyModel) -> Iterator[DetectorServer]:
    with tiny_text_server(tiny_text_model, batch_wait_ms=5) as server:
        yield server


@pytest.fixture(scope="module")
def calls_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calls") / "calls.jsonl"
    rows = [record("calls/normal-1", 2).model_copy(update={"labels": CallLabels(is_fraud=False)}), record()]
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows), "utf-8")
    return path


def test_transcript_over_websocket_and_http_prints_decisions_and_the_verdict(
    text_server: DetectorServer, calls_file: Path
) -> None:
    for extra in ([], ["--http"]):
        result = runner.invoke(
            app,
            [
                "stream",
                str(calls_file),
                "--url",
                text_server.url,
                "--speed",
                "0",
                "--index",
                "1",
                "-v",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        out = result.output
        assert "streaming transcript calls/fraud-7 (4 chunks" in out
        # over HTTP each chunk waits for its answer: one evaluation per finished turn; the WebSocket sends on
        # schedule (here at once), so turns that arrive while the model is busy are evaluated together
        assert out.count(" is_fraud ") == 4 if extra else 1 <= out.count(" is_fraud ") <= 4, out
        assert "acked" in out and "verdict for calls/fraud-7" in out and "source label" in out

    # the library: real-time pacing at 20x, every decision with a client-side latency, one verdict
    script = transcript_script(record())
    assert [c.at for c in script.chunks] == sorted(c.at for c in script.chunks) and script.duration > 5
    events: list[str] = []
    result = asyncio.run(
        replay_call(text_server.url, script, speed=20, on_event=lambda e: events.append(e.kind))
    )
    assert result.wall_s >= script.duration / 20 * 0.9  # paced, not as fast as possible
    assert events[0] == "opened" and events[-1] == "verdict" and events.count("ack") == 4
    assert result.verdict["chunks"] == 4 and result.verdict["decisions"] == len(result.decisions)
    # a turn that arrives while the model is still busy is evaluated with the next (a loaded machine batches
    # turns even at 20x), but the call's last turn is always evaluated
    assert 1 <= result.evaluations <= 4 and all(d.latency_s > 0 for d in result.decisions)
    assert max(d.decision["seq"] for d in result.decisions if d.decision.get("round") == "is_fraud") == 3
    assert all(c.round_trip_s is not None and c.round_trip_s > 0 for c in result.chunks)


def test_dialogue_file_by_index_and_call_id(text_server: DetectorServer, tmp_path: Path) -> None:
    dialogues = tmp_path / "fraud_dialogues-test.jsonl"
    rows = [
        {"tts_id": f"tts_{i}", "left": ["您好，我是银行客服。", "请转账到安全账户。"], "right": ["什么事？"]}
        | {"fraud_type": "银行诈骗"}
        for i in range(3)
    ]
    dialogues.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    assert load_record(dialogues, index=2).call_id == "fraud_dialogues-test/tts_2"
    assert load_record(dialogues, call_id="tts_1").call_id == "fraud_dialogues-test/tts_1"
    with pytest.raises(CallSourceError, match="out of range"):
        load_record(dialogues, index=3)
    result = runner.invoke(
        app,
        ["stream", str(dialogues), "--url", text_server.url, "--speed", "0", "--call-id", "tts_1", "--http"],
    )
    assert result.exit_code == 0, result.output
    assert "fraud_dialogues-test/tts_1 (3 chunks" in result.output and "verdict" in result.output


def test_exit_codes_for_a_bad_url_a_refused_call_and_a_bad_file(
    text_server: DetectorServer, calls_file: Path, tmp_path: Path
) -> None:
    # nothing listens on port 1
    for extra in ([], ["--http"]):
        bad = runner.invoke(app, ["stream", str(calls_file), "--url", "http://127.0.0.1:1", *extra])
        assert bad.exit_code == 1 and "connection_error" in bad.output, bad.output
    # opening a call id twice: the second open is refused with 409 call_exists and the server's message
    for extra in ([], ["--http"]):
        args = ["stream", str(calls_file), "--url", text_server.url, "--speed", "0", "--index", "0"]
        call_id = f"twice{'-http' if extra else ''}"
        first = runner.invoke(app, [*args, "--server-call-id", call_id, *extra])
        assert first.exit_code == 0, first.output
        second = runner.invoke(app, [*args, "--server-call-id", call_id, *extra])
        assert second.exit_code == 1, second.output
        assert "409 call_exists" in second.output and call_id in second.output
    with pytest.raises(StreamError) as err:
        asyncio.run(replay_call(text_server.url, transcript_script(record()), call_id="twice", speed=0))
    assert err.value.status == 409 and err.value.reason == "call_exists"
    missing = runner.invoke(app, ["stream", str(tmp_path / "nope.jsonl"), "--url", text_server.url])
    assert missing.exit_code == 2 and "no such file" in missing.output


# ------------------------------------------------------------------------------------------------ audio


@pytest.fixture(scope="module")
def synthesized_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from teleguard.data.audio import synthesize_call

    out = tmp_path_factory.mktemp("audio") / "call.wav"
    synthesize_call(record(turns=2), out, workers=1)
    return out


def test_audio_call_over_websocket_and_http(tiny_audio_model: TinyModel, synthesized_wav: Path) -> None:
    script = load_call(synthesized_wav, chunk_seconds=1.0)
    assert script.kind == "audio" and script.modality == "audio" and len(script.chunks) >= 3
    config = ServeConfig(
        model=str(tiny_audio_model.path),
        port=0,
        engine=EngineConfig(kind="transformers", device="cpu", max_tokens=6),
        policy=DecisionPolicy(every_seconds=2.0, on_turn=False, ask_scene="never", max_tokens=6),
        detector=DetectorConfig(engine_timeout_s=60.0),
    )
    with running(build_server(config, metrics=DetectorMetrics(CollectorRegistry()))) as server:
        for extra in ([], ["--http"]):
            result = runner.invoke(
                app, ["stream", str(synthesized_wav), "--url", server.url, "--speed", "0", *extra]
            )
            assert result.exit_code == 0, result.output
            assert f"streaming audio call.wav ({len(script.chunks)} chunks" in result.output
            assert "is_fraud" in result.output and "verdict for call.wav" in result.output
        replayed = asyncio.run(replay_call(server.url, script, speed=0, transport="http"))
    assert replayed.verdict["audio_seconds"] == pytest.approx(script.duration, abs=1e-3)
    assert replayed.verdict["chunks"] == len(script.chunks)
    assert replayed.evaluations >= 1 and replayed.decisions[0].decision["audio_time"] == pytest.approx(2.0)
