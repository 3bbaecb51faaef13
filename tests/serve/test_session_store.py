"""The session store's interface on both backends (in-memory and a real Redis on loopback), and the detector on
it: sequence checks, bounds, leases, commits, closing and expiry behave alike; two detectors sharing one Redis
serve one call between them as one detector does; a store that cannot be reached answers 503
store_unavailable and makes the detector unready.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from prometheus_client import CollectorRegistry

from teleguard.loopback import free_port
from teleguard.serve.chunks import ChunkLimits, parse_chunk
from teleguard.serve.detector import Detector, DetectorConfig, Unavailable, build_store
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import Chunk, Decision, OpenCall, RequestError, Round
from teleguard.serve.redis_store import decode_block, encode_block
from teleguard.serve.session import CallSession, PolicyState, SessionLimits
from teleguard.serve.store import SessionStore, StoreConfig
from tests.support.detector import ScriptedEngine, b64, pcm16, segments
from tests.support.redis_server import RedisServer

BACKENDS = ["memory", "redis"]
LIMITS = SessionLimits(clip_seconds=0.5, max_clips=2, max_transcript_chars=40, remember_chunks=2)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def store_url(backend: str, request: pytest.FixtureRequest) -> str:
    return "memory" if backend == "memory" else request.getfixturevalue("redis_url")


def make_store(url: str, prefix: str, *, limits: SessionLimits = LIMITS, **store: Any) -> SessionStore:
    return build_store(
        url,
        StoreConfig(key_prefix=prefix, **store),
        max_calls=3,
        ttl_seconds=60,
        limits=limits,
        chunk_limits=ChunkLimits(),
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"  # each test its own keys in the shared Redis


def chunk(seq: int, call_id: str = "c1", **fields: Any) -> Chunk:
    return parse_chunk({"call_id": call_id, "seq": seq, **fields})


def seg(text: str, start: float, end: float) -> dict[str, Any]:
    return {"speaker": "left", "text": text, "start": start, "end": end}


def wav_float(samples: np.ndarray) -> str:
    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="WAV", subtype="FLOAT")
    return b64(buf.getvalue())


def reason(coro: Any) -> str:
    with pytest.raises(RequestError) as info:
        run(coro)
    return info.value.reason


# --- the interface ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_checks_and_call_lifetime(backend: str, request: pytest.FixtureRequest) -> None:
    store = make_store(store_url(backend, request), prefix())

    async def main() -> None:
        await store.start()
        await store.open(OpenCall(call_id="c1", language="en", metadata={"line": 7}))
        with pytest.raises(RequestError, match="already open"):
            await store.open(OpenCall(call_id="c1"))
        first = await store.receive(chunk(0, segments=[seg("hello", 0, 1)]))
        assert first.new and first.session.next_seq == 1 and first.session.language == "en"
        assert first.session.metadata == {"line": 7}
        again = await store.receive(chunk(0, segments=[seg("hello", 0, 1)]))
        assert not again.new and again.session.next_seq == 1  # a retry: counted once
        for bad, why in (
            (chunk(5, segments=[seg("x", 1, 2)]), "sequence_gap"),
            (chunk(0, segments=[seg("other", 0, 1)]), "out_of_order"),
            (chunk(0, call_id="nobody", segments=[seg("x", 0, 1)]), "unknown_call"),
            (chunk(1, audio="not*base64"), "invalid_base64"),
        ):
            with pytest.raises(RequestError) as info:
                await store.receive(bad)
            assert info.value.reason == why
        # the sequence is checked before the content: a gap with bad audio is a gap
        with pytest.raises(RequestError) as info:
            await store.receive(chunk(4, audio="not*base64"))
        assert info.value.reason == "sequence_gap" and "expected chunk seq 1" in info.value.message
        # a retry of an accepted chunk is not decoded again (as in memory): bad content, same digest rules
        assert (await store.receive(chunk(0, segments=[seg("hello", 0, 1)]))).new is False
        for i in (2, 3):
            await store.open(OpenCall(call_id=f"c{i}"))
        with pytest.raises(RequestError) as info:
            await store.open(OpenCall(call_id="c4"))
        assert info.value.reason == "too_many_calls"
        assert await store.open_calls() == 3 and store.carried == 3
        # closing: through a lease, with the verdict; late chunks are closed_call, the call is kept till the TTL
        lease = await store.lease("c1")
        assert lease is not None and await store.lease("c1") is None  # one holder
        session = await store.get("c1", audio=True)
        session.close()
        from teleguard.serve.policy import DecisionPolicy

        verdict = DecisionPolicy().verdict(session)
        assert await store.commit(lease, session, decisions_before=0, verdict=verdict)
        with pytest.raises(RequestError) as info:
            await store.receive(chunk(1, segments=[seg("late", 1, 2)]))
        assert info.value.reason == "closed_call"
        closed = await store.get("c1", open_only=False)
        assert closed.closed and closed.verdict == verdict and closed.next_seq == 1
        with pytest.raises(RequestError, match="is closed"):
            await store.get("c1")
        assert await store.open_calls() == 2
        await store.open(OpenCall(call_id="c5"))  # a closed call frees its place
        await store.aclose()

    run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_holds_what_a_session_in_memory_holds(backend: str, request: pytest.FixtureRequest) -> None:
    """Audio (mono, stereo, float WAV) and transcript are bounded as CallSession bounds them."""
    rng = np.random.default_rng(3)
    stereo = rng.integers(-9000, 9000, size=(5000, 2), dtype="<i2")
    floats = rng.uniform(-0.5, 0.5, size=(3000, 1)).astype(np.float32)
    chunks = [
        chunk(0, audio=b64(pcm16(0.3, seed=1)), segments=[seg("第一句话很长很长", 0, 0.3)]),
        chunk(1, audio=b64(stereo.tobytes()), channels=2),
        chunk(2, wav=wav_float(floats), segments=[seg("第二句", 0.6, 0.9), seg("第三句话", 0.9, 1.0)]),
        chunk(3, audio=b64(pcm16(0.9, seed=2)), segments=[seg("最后" * 10, 1.0, 1.95)]),
        chunk(4, segments=[seg("尾声", 2.0, 2.5)]),
    ]
    reference = CallSession("c1", limits=LIMITS)
    store = make_store(store_url(backend, request), prefix())

    async def main() -> None:
        await store.open(OpenCall(call_id="c1"))
        for c in chunks:
            assert reference.receive(c)
            assert (await store.receive(c)).new
        check(await store.get("c1", audio=True))
        # only the last `remember_chunks` digests tell a conflict from a retry
        with pytest.raises(RequestError, match="different content"):
            await store.receive(chunk(4, segments=[seg("别的", 2.0, 2.5)]))
        assert (await store.receive(chunk(1, segments=[seg("别的", 2.0, 2.5)]))).new is False

    def check(got: CallSession) -> None:
        assert np.array_equal(got.audio(), reference.audio()) and got.audio().shape[0] == 16_000  # 1 s kept
        assert got.transcript() == reference.transcript() and got.transcript().startswith(
            "左：第三句话\n左：最后"
        )
        for name in ("next_seq", "audio_samples", "transcript_end", "segments_received", "audio_time"):
            assert getattr(got, name) == getattr(reference, name), name
        assert got.has_audio and got.held_audio_seconds == reference.held_audio_seconds

    run(main())


def test_audio_blocks_are_stored_exactly() -> None:
    pcm = np.random.default_rng(0).integers(-32768, 32767, size=(100, 2)).astype(np.float32) / 32768
    weird = np.array([[0.1], [np.float32(1 / 3)]], dtype=np.float32)
    assert encode_block(pcm)[:1] == b"h" and np.array_equal(decode_block(encode_block(pcm)), pcm)
    assert encode_block(weird)[:1] == b"f" and np.array_equal(decode_block(encode_block(weird)), weird)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leases_commits_and_expiry(backend: str, request: pytest.FixtureRequest) -> None:
    store = make_store(store_url(backend, request), prefix())
    decision = Decision(call_id="c1", seq=0, round=Round.FRAUD, is_fraud=True, audio_time=1.0, latency_s=0.1)

    async def main() -> None:
        await store.open(OpenCall(call_id="c1"))
        await store.receive(chunk(0, segments=[seg("hello", 0, 1)]))
        lease = await store.lease("c1")
        assert lease is not None
        held = await store.get("c1", audio=True, lease=lease)
        # another request sees the evaluation in flight (in memory: the policy marks it while it runs)
        if store.shared:
            assert (await store.get("c1")).evaluating and not held.evaluating
        held.model_calls, held.alerts, held.is_fraud, held.evaluated_segments = 2, 1, True, 1
        held.decisions.append(decision)
        assert await store.renew(lease)
        assert await store.commit(lease, held, decisions_before=0)
        assert not await store.renew(lease)  # released by the commit
        again = await store.get("c1")
        assert again.policy_state() == PolicyState(
            model_calls=2, alerts=1, is_fraud=True, evaluated_segments=1
        )
        assert again.decisions == [decision] and again.decisions_for(0) == [decision]
        # a lease released without writing leaves the call as it was
        lease = await store.lease("c1")
        assert lease is not None
        await store.release(lease)
        assert await store.lease("c1") is not None
        # a commit with a lease that is not held writes nothing
        if store.shared:
            stale = await store.wait_lease("c1", 0.05)
            assert stale is None

    run(main())


def test_redis_lease_lapses_when_its_holder_is_gone(request: pytest.FixtureRequest) -> None:
    store = make_store(request.getfixturevalue("redis_url"), prefix(), lease_seconds=0.3)

    async def main() -> None:
        await store.open(OpenCall(call_id="c1"))
        dead = await store.lease("c1")  # a replica that took the call and died
        assert dead is not None and await store.lease("c1") is None
        taken = await store.wait_lease("c1", 5.0)
        assert taken is not None  # after the lease's 0.3 s
        session = await store.get("c1")
        assert not await store.commit(dead, session, decisions_before=0)  # the dead holder's write is refused
        assert await store.commit(taken, session, decisions_before=0)

    run(main())


# --- the detector on each store; two detectors sharing one Redis ------------------------------------------------


def detector_on(
    url: str, key_prefix: str, engine: ScriptedEngine, *, timeout_s: float = 1.0, **config: Any
) -> Detector:
    detector_config = DetectorConfig(
        session_store=url,
        store=StoreConfig(key_prefix=key_prefix, lease_seconds=0.5, timeout_s=timeout_s),
        engine_timeout_s=2.0,
        ttl_seconds=config.pop("ttl_seconds", 60.0),
        **config,
    )
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="until_known", max_tokens=64)
    return Detector(
        engine, policy=policy, config=detector_config, metrics=DetectorMetrics(CollectorRegistry())
    )


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on where a call ran: everything but latencies."""
    decisions = [{k: v for k, v in d.items() if k != "latency_s"} for d in result["decisions"]]
    return {"decisions": decisions, "verdict": result["verdict"]}


async def stream(pick: Callable[[int], Detector], call_id: str, turns: int = 4) -> dict[str, Any]:
    await pick(0).open({"call_id": call_id})
    decisions: list[dict[str, Any]] = []
    for seq, seg_ in enumerate(segments(turns)):
        result = await pick(seq).chunk({"call_id": call_id, "seq": seq, "segments": seg_})
        decisions += [d.model_dump(mode="json") for d in result.decisions]
    closed = await pick(turns).close({"call_id": call_id, "last_seq": turns - 1})
    decisions += [d.model_dump(mode="json") for d in closed.decisions]
    return {"decisions": decisions, "verdict": closed.verdict.model_dump(mode="json")}


def test_two_detectors_sharing_redis_serve_a_call_as_one_detector_in_memory(
    request: pytest.FixtureRequest,
) -> None:
    url, key = request.getfixturevalue("redis_url"), prefix()

    async def main() -> None:
        alone = detector_on("memory", key, ScriptedEngine())
        reference = {c: await stream(lambda _: alone, c) for c in ("fraud-1", "normal-1")}
        a, b = detector_on(url, key, ScriptedEngine()), detector_on(url, key, ScriptedEngine())
        for d in (a, b):
            await d.start()
        for call_id in ("fraud-1", "normal-1"):
            shared = await stream(lambda seq: (a, b)[seq % 2], call_id)
            assert comparable(shared) == comparable(reference[call_id])
        assert (
            reference["fraud-1"]["verdict"]["is_fraud"] and not reference["normal-1"]["verdict"]["is_fraud"]
        )
        # metrics: every call completed once between the two, the active calls back to zero
        completed = sum(
            d.metrics.calls_completed.labels(verdict=v)._value.get()
            for d in (a, b)
            for v in ("fraud", "normal")
        )
        assert completed == 2
        # (a replica counts the calls it carries again every sweep: one may have taken its calls over)
        assert sum([await d.count_carried() for d in (a, b)]) == 0
        assert a.metrics.active_calls._value.get() == b.metrics.active_calls._value.get() == 0
        assert sum(d.metrics.chunks._value.get() for d in (a, b)) == 8
        # resume from either: the last chunk taken and the verdict
        resumed = await b.resume({"call_id": "fraud-1"})
        assert (resumed.last_seq, resumed.closed, resumed.verdict is not None) == (3, True, True)
        for d in (a, b):
            await d.aclose(0)

    run(main())


def test_the_same_chunk_on_two_detectors_at_once_is_taken_once(request: pytest.FixtureRequest) -> None:
    url, key = request.getfixturevalue("redis_url"), prefix()

    async def main() -> None:
        engine = ScriptedEngine(delay=0.05)
        a, b = detector_on(url, key, engine), detector_on(url, key, engine)
        await a.open({"call_id": "normal-race"})
        answered: list[Decision] = []
        for seq, seg_ in enumerate(segments(3)):
            message = {"call_id": "normal-race", "seq": seq, "segments": seg_}
            first, second = await asyncio.gather(a.chunk(message), b.chunk(message))
            assert sorted([first.duplicate, second.duplicate]) == [False, True]
            # both answers carry the decisions made on the chunk, made once
            assert first.decisions == second.decisions and first.decisions
            answered += first.decisions
        # every turn evaluated exactly once: one is_fraud request per chunk reached the engine
        fraud_rounds = [r for batch in engine.batches for r in batch if r.round is Round.FRAUD]
        verdict = (await b.close({"call_id": "normal-race", "last_seq": 2})).verdict
        assert len(fraud_rounds) == 3 and verdict.decisions == len(answered)
        assert verdict.chunks == 3 and verdict.model_calls == sum(len(batch) for batch in engine.batches)
        assert sum(d.metrics.chunks._value.get() for d in (a, b)) == 3

    run(main())


def test_an_idle_call_expires_once_across_detectors(request: pytest.FixtureRequest) -> None:
    url, key = request.getfixturevalue("redis_url"), prefix()

    async def main() -> None:
        a = detector_on(url, key, ScriptedEngine(), ttl_seconds=0.3)
        b = detector_on(url, key, ScriptedEngine(), ttl_seconds=0.3)
        await a.open({"call_id": "fraud-idle"})
        await a.chunk({"call_id": "fraud-idle", "seq": 0, "segments": segments(1)[0]})
        await asyncio.sleep(0.4)
        expired = await asyncio.gather(a.expire(), b.expire())
        assert sum(len(v) for v in expired) == 1
        assert sum(d.metrics.calls_expired._value.get() for d in (a, b)) == 1
        with pytest.raises(RequestError) as info:
            await b.chunk({"call_id": "fraud-idle", "seq": 1, "segments": segments(2)[1]})
        assert info.value.reason == "unknown_call"  # forgotten, as in memory

    run(main())


def test_an_unreachable_store_answers_503_and_the_detector_is_unready(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> None:
        detector = detector_on(url, prefix(), ScriptedEngine(), timeout_s=0.3)
        with pytest.raises(Unavailable) as info:
            await detector.open({"call_id": "c1"})
        body = info.value.to_dict()
        assert info.value.status == 503 and body["error"] == "store_unavailable" and body["retryable"]
        assert not await detector.ready()
        assert detector.metrics.store_errors.labels(kind="error")._value.get() >= 2
        # it comes back: a Redis started on that port serves the same detector
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        server = RedisServer(tmp_path, port=port).start()
        try:
            assert await detector.ready()
            await detector.open({"call_id": "c1"})
            assert (await detector.chunk({"call_id": "c1", "seq": 0, "segments": segments(1)[0]})).decisions
        finally:
            await detector.aclose(0)
            server.stop()

    run(main())


def test_the_store_setting_is_checked_and_its_password_never_shown() -> None:
    from pydantic import ValidationError

    from teleguard.serve.store import redact

    assert DetectorConfig().session_store == "memory"
    assert DetectorConfig(session_store="rediss://:pw@host:6380/2").session_store.startswith("rediss://")
    from teleguard.yaml_files import field_errors

    with pytest.raises(ValidationError) as info:
        DetectorConfig(session_store="mysql://user:secret@db/0")
    [message] = field_errors(info.value)  # what `teleguard serve` prints
    assert "secret" not in message and "***@db/0" in message and "session_store" in message
    assert redact("redis://:pw@h:1/0") == "redis://***@h:1/0" and redact("memory") == "memory"
