"""The real-time detector's core: chunk decoding, call sessions and the decision policy (scripted engine).

The engine here is a scripted `generate` that returns fixed answers written with the contract's
`format_answer`: these are unit tests of the policy's rules, not of a model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from teleguard.contract import Round, Stage, builtin_prompts, format_answer
from teleguard.data.audio import write_wav
from teleguard.data.audio_clips import ClipWriter
from teleguard.data.prefixes import PrefixPolicy, cut_prefixes
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.data.rounds import RowBuilder, Sample
from teleguard.engines.contract import EngineError, EngineRequest, Generation
from teleguard.serve.chunks import ChunkLimits, DecodedChunk, decode_chunk, parse_chunk
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import (
    REASON_STATUS,
    Chunk,
    CloseCall,
    Decision,
    OpenCall,
    RequestError,
    parse_message,
)
from teleguard.serve.session import CallRegistry, CallSession, SessionLimits, render_segment

RATE = 16_000
FRAUD_TYPE = "银行诈骗"
SCENE = "咨询客服"

# ------------------------------------------------------------------------------------------------ helpers


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pcm16(samples: np.ndarray) -> bytes:
    """int16 samples of shape (n,) or (n, channels) as raw little-endian PCM16 bytes."""
    return np.asarray(samples, dtype="<i2").tobytes()


def wav_bytes(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Random int16 audio of shape (samples, channels)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, size=(round(seconds * RATE), channels), dtype=np.int16)


def chunk(seq: int, call_id: str = "c1", **fields: Any) -> Chunk:
    return parse_chunk({"call_id": call_id, "seq": seq, **fields})


def seg(text: str, start: float, end: float, speaker: str = "left") -> dict[str, Any]:
    return {"speaker": speaker, "text": text, "start": start, "end": end}


def reason_of(fn: Callable[[], object]) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn()
    return info.value


def fraud_answer(is_fraud: bool | None, confidence: float = 0.9, stage: str = "late_stage") -> str:
    return format_answer(Round.FRAUD, is_fraud, stage=stage, reason="r", confidence=confidence, think="t")


class Scripted:
    """A `generate` that answers each request by its round, recording every batch it was sent."""

    def __init__(
        self,
        is_fraud: Sequence[str] | str = (),
        *,
        scene: str | None = None,
        fraud_type: str | None = None,
    ) -> None:
        self.fraud = [is_fraud] if isinstance(is_fraud, str) else list(is_fraud)
        self.scene = scene or format_answer(Round.SCENE, SCENE, stage="late_stage", confidence=0.8, think="t")
        self.fraud_type = fraud_type or format_answer(
            Round.FRAUD_TYPE, FRAUD_TYPE, stage="late_stage", confidence=0.7, think="t"
        )
        self.batches: list[list[EngineRequest]] = []
        self.fraud_calls = 0

    @property
    def requests(self) -> list[EngineRequest]:
        return [r for batch in self.batches for r in batch]

    def rounds(self) -> list[Round]:
        return [r.round for r in self.requests]

    async def __call__(self, requests: Sequence[EngineRequest]) -> list[str | Generation]:
        self.batches.append(list(requests))
        out: list[str | Generation] = []
        for r in requests:
            if r.round is Round.FRAUD:
                # the last scripted answer repeats once the script runs out
                out.append(
                    self.fraud[min(self.fraud_calls, len(self.fraud) - 1)]
                    if self.fraud
                    else fraud_answer(False)
                )
                self.fraud_calls += 1
            elif r.round is Round.SCENE:
                out.append(self.scene)
            else:
                out.append(Generation(self.fraud_type, tokens=42))
        return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def feed_all(
    policy: DecisionPolicy, session: CallSession, chunks: Sequence[Chunk], engine: Scripted
) -> list[Decision]:
    decisions: list[Decision] = []
    for c in chunks:
        decisions += run(policy.feed(session, c, engine)).decisions
    return decisions


def audio_chunks(seconds: float, every: float, call_id: str = "c1", channels: int = 1) -> list[Chunk]:
    audio = tone(seconds, channels)
    step = round(every * RATE)
    return [
        chunk(i, call_id, audio=b64(pcm16(audio[start : start + step])), channels=channels)
        for i, start in enumerate(range(0, audio.shape[0], step))
    ]


def turn_chunks(n: int, call_id: str = "c1", seconds: float = 2.0) -> list[Chunk]:
    speakers = ("left", "right")
    return [
        chunk(i, call_id, segments=[seg(f"第{i}句话", i * seconds, (i + 1) * seconds, speakers[i % 2])])
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------- protocol


def test_every_reason_has_a_status_and_errors_carry_it() -> None:
    assert set(REASON_STATUS.values()) <= {400, 404, 409, 413, 429}
    err = RequestError("payload_too_large", "too big", field="audio")
    assert err.status == 413 and err.to_dict() == {
        "error": "payload_too_large",
        "status": 413,
        "field": "audio",
        "message": "too big",
    }
    with pytest.raises(ValueError, match="unknown reason"):
        RequestError("no_such_reason", "x")


def test_open_call_generates_an_id_and_validates_fields() -> None:
    a, b = OpenCall(), OpenCall()
    assert a.call_id != b.call_id and a.language is None and a.modality == "auto"
    err = reason_of(lambda: parse_message(OpenCall, {"language": "fr"}))
    assert err.reason == "invalid_request" and err.field == "language" and "language" in err.message
    err = reason_of(lambda: parse_message(OpenCall, {"metadata": {str(i): i for i in range(40)}}))
    assert err.field == "metadata"
    assert parse_message(CloseCall, '{"call_id": "c1", "last_seq": 3}').last_seq == 3
    err = reason_of(lambda: parse_message(Chunk, '{"call_id": "c1", "seq": 0, "audo": "AAAA"}'))
    assert err.reason == "invalid_request" and err.field == "audo"
    assert reason_of(lambda: parse_message(Chunk, "[1, 2]")).reason == "invalid_request"
    assert reason_of(lambda: parse_message(Chunk, 42)).reason == "invalid_request"


# ---------------------------------------------------------------------------------------------- chunks


def test_raw_pcm_and_wav_decode_to_the_same_float_audio() -> None:
    stereo = tone(0.25, 2)
    raw = decode_chunk(chunk(0, audio=b64(pcm16(stereo)), channels=2))
    wav = decode_chunk(chunk(0, wav=b64(wav_bytes(stereo))))
    assert raw.audio is not None and wav.audio is not None
    assert raw.audio.dtype == np.float32 and raw.audio.shape == (4000, 2)
    np.testing.assert_array_equal(raw.audio, wav.audio)
    np.testing.assert_array_equal(raw.audio, stereo.astype(np.float32) / 32768)
    mono = decode_chunk(chunk(0, audio=b64(pcm16(stereo[:, 0]))))
    assert mono.audio is not None and mono.audio.shape == (4000, 1) and mono.seconds == 0.25


def test_wav_with_float_samples_and_line_wrapped_base64_decode() -> None:
    audio = (tone(0.1, 1).astype(np.float32) / 32768).astype(np.float32)
    text = base64.encodebytes(wav_bytes(audio, subtype="FLOAT")).decode("ascii")  # newline every 76 chars
    decoded = decode_chunk(chunk(0, wav=text))
    assert decoded.audio is not None
    np.testing.assert_allclose(decoded.audio, audio)


def test_segments_only_chunk_and_segment_rendering() -> None:
    decoded = decode_chunk(chunk(0, segments=[seg("你好", 0, 1.5), seg("hi", 1.5, 2, "agent")]))
    assert decoded.audio is None and decoded.seconds == 0
    assert [render_segment(s) for s in decoded.segments] == ["左：你好", "agent：hi"]


NOT_WAV = b64(b"RIFF....WAVEfmt definitely not a real wave file")

BAD_CHUNKS: list[tuple[str, dict[str, Any], str, str | None]] = [
    # (what, chunk fields, reason, field)
    ("bad base64", {"audio": "!!!not base64!!!"}, "invalid_base64", "audio"),
    ("bad base64 padding", {"wav": "AAA"}, "invalid_base64", "wav"),
    ("non-ascii base64", {"audio": "ÄÖÜ="}, "invalid_base64", "audio"),
    ("raw at 8 kHz", {"audio": b64(b"\x00\x00"), "sample_rate": 8000}, "wrong_sample_rate", "sample_rate"),
    ("wav at 8 kHz", {"wav": b64(wav_bytes(tone(0.1, 1), rate=8000))}, "wrong_sample_rate", "wav"),
    ("raw 3 channels", {"audio": b64(b"\x00" * 12), "channels": 3}, "wrong_channels", "channels"),
    ("raw 0 channels", {"audio": b64(b"\x00" * 12), "channels": 0}, "wrong_channels", "channels"),
    ("wav 3 channels", {"wav": b64(wav_bytes(tone(0.1, 3)))}, "wrong_channels", "wav"),
    ("text as wav", {"wav": b64(b"hello, this is not audio at all")}, "not_audio", "wav"),
    ("broken wav header", {"wav": NOT_WAV}, "not_audio", "wav"),
    ("flac as wav", {"wav": b64(wav_bytes(tone(0.1, 1), fmt="FLAC"))}, "not_audio", "wav"),
    ("odd byte count", {"audio": b64(b"\x00\x01\x02")}, "invalid_pcm", "audio"),
    ("half a stereo frame", {"audio": b64(b"\x00\x01"), "channels": 2}, "invalid_pcm", "audio"),
    ("nothing", {}, "empty_chunk", None),
    ("empty audio", {"audio": ""}, "empty_chunk", None),
    ("both audio and wav", {"audio": b64(b"\x00\x00"), "wav": b64(b"\x00\x00")}, "invalid_request", "wav"),
]


@pytest.mark.parametrize(("what", "fields", "reason", "field"), BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS])
def test_bad_chunks_are_refused_with_their_reason(
    what: str, fields: dict[str, Any], reason: str, field: str | None
) -> None:
    err = reason_of(lambda: decode_chunk(chunk(0, **fields)))
    assert (err.reason, err.field) == (reason, field), err.message
    assert err.status == REASON_STATUS[reason]
    if field:
        assert field in err.message


def test_non_finite_wav_samples_are_not_audio() -> None:
    audio = np.zeros((100, 1), dtype=np.float32)
    audio[5] = np.nan
    err = reason_of(lambda: decode_chunk(chunk(0, wav=b64(wav_bytes(audio, subtype="FLOAT")))))
    assert err.reason == "not_audio" and "finite" in err.message


BAD_SEGMENTS = [
    ("end before start", seg("x", 2.0, 1.0), "segments.0"),
    ("negative start", seg("x", -1.0, 1.0), "segments.0.start"),
    ("negative end", seg("x", 0.0, -0.5), "segments.0.end"),
    ("blank text", seg("  ", 0.0, 1.0), "segments.0.text"),
    ("missing times", {"speaker": "left", "text": "x"}, "segments.0.start"),
]


@pytest.mark.parametrize(("what", "segment", "field"), BAD_SEGMENTS, ids=[b[0] for b in BAD_SEGMENTS])
def test_bad_segments_are_invalid_segment(what: str, segment: dict[str, Any], field: str) -> None:
    err = reason_of(lambda: parse_chunk({"call_id": "c1", "seq": 0, "segments": [segment]}))
    assert err.reason == "invalid_segment" and err.field == field and err.status == 400, err.message


def test_infinite_segment_time_is_refused_from_json() -> None:
    err = reason_of(
        lambda: parse_chunk(
            '{"call_id": "c1", "seq": 0, "segments": [{"speaker": "left", '
            '"text": "x", "start": 0, "end": Infinity}]}'
        )
    )
    assert err.reason in ("invalid_segment", "invalid_request")


def test_payload_limit_is_checked_from_the_base64_length_before_decoding() -> None:
    limits = ChunkLimits(max_audio_bytes=1000)
    ok = decode_chunk(chunk(0, audio=b64(b"\x00" * 1000)), limits)
    assert ok.audio is not None and ok.audio.shape == (500, 1)
    err = reason_of(lambda: decode_chunk(chunk(0, audio=b64(b"\x00" * 1002)), limits))
    assert err.reason == "payload_too_large" and err.status == 413 and err.field == "audio"
    # not valid base64 either: the size is refused first, so nothing big was decoded
    err = reason_of(lambda: decode_chunk(chunk(0, wav="!" * 5000), limits))
    assert err.reason == "payload_too_large" and err.field == "wav"
    err = reason_of(
        lambda: decode_chunk(chunk(0, segments=[seg("x" * 30, 0, 1)]), ChunkLimits(max_text_chars=20))
    )
    assert err.reason == "payload_too_large" and err.field == "segments"
    many = [seg("x", 0, 1)] * 5
    err = reason_of(lambda: decode_chunk(chunk(0, segments=many), ChunkLimits(max_segments=4)))
    assert err.reason == "payload_too_large"


def _real_wav_variants() -> list[bytes]:
    return [
        wav_bytes(tone(0.05, c), subtype=s) for c in (1, 2) for s in ("PCM_16", "PCM_U8", "FLOAT", "ULAW")
    ]


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _wav_field(draw: st.DrawFn) -> str:
    """base64 of: random bytes, or a real WAV with bytes flipped, cut or appended."""
    kind = draw(st.sampled_from(["random", "mutated", "cut"]))
    if kind == "random":
        return b64(draw(st.binary(max_size=300)))
    data = bytearray(draw(st.sampled_from(_real_wav_variants())))
    if kind == "cut":
        return b64(bytes(data[: draw(st.integers(0, len(data)))]))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, min(len(data) - 1, 80)))  # mostly the header, where parsers break
        data[pos] = draw(st.integers(0, 255))
    return b64(bytes(data))


_time = st.floats(-10, 1e6) | st.sampled_from([float("nan"), float("inf"), -0.0])
_weird_segment = st.fixed_dictionaries(
    {
        "speaker": st.sampled_from(["left", "", "客服"]),
        "text": st.text(max_size=5),
        "start": _time,
        "end": _time,
    }
)
_good_segment = st.builds(
    lambda speaker, text, start, length: {
        "speaker": speaker,
        "text": text,
        "start": start,
        "end": start + length,
    },
    st.sampled_from(["left", "right", "客服"]),
    st.text(min_size=1, max_size=10).filter(str.strip),
    st.floats(0, 1e4),
    st.floats(0, 30),
)
_segment = st.one_of(_good_segment, _good_segment, _good_segment, _weird_segment)  # mostly valid
# Mostly well-formed envelopes, so that the decoder itself is exercised, not only the schema.
_chunk_data = st.fixed_dictionaries(
    {"call_id": st.just("c1"), "seq": st.integers(0, 3)},
    optional={
        "audio": st.binary(max_size=3000).map(b64) | st.text(max_size=40),
        "wav": _wav_field() | st.text(max_size=40),
        "channels": st.integers(-1, 4),
        "sample_rate": st.sampled_from([16000, 16000, 8000, 0]),
        "segments": st.lists(_segment, max_size=3),
    },
)
# Anything at all: wrong types, unknown fields, nested junk.
_garbage = _json | st.fixed_dictionaries(
    {"call_id": st.sampled_from(["c1", "", "a b", 7]) | _json_leaf, "seq": st.integers(-2, 3) | _json_leaf},
    optional={"audio": _json, "wav": _json, "channels": _json, "segments": _json, "extra": _json},
)


def _decode_or_refuse(data: Any) -> str:
    """Decode one input; only RequestError may come out. Returns what happened, for the statistics."""
    limits = ChunkLimits(max_audio_bytes=2000)
    try:
        decoded = decode_chunk(parse_chunk(data), limits)
    except RequestError as err:
        assert err.reason in REASON_STATUS and err.message and err.status == REASON_STATUS[err.reason]
        return err.reason
    assert isinstance(decoded, DecodedChunk)
    assert decoded.audio is not None or decoded.segments
    if decoded.audio is not None:
        assert decoded.audio.dtype == np.float32 and decoded.audio.ndim == 2
        assert decoded.audio.shape[1] in (1, 2) and decoded.audio.shape[0] > 0
        assert np.isfinite(decoded.audio).all()
    return "decoded"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_chunk_data)
def test_fuzz_decoder_accepts_or_refuses_with_request_error(data: dict[str, Any]) -> None:
    event(_decode_or_refuse(data))
    event(_decode_or_refuse(json.dumps(data, allow_nan=True)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_garbage)
def test_fuzz_any_json_is_refused_with_request_error(data: Any) -> None:
    _decode_or_refuse(data)
    _decode_or_refuse(json.dumps(data, allow_nan=True))


# --------------------------------------------------------------------------------------------- session


def test_sequence_retry_is_not_counted_twice_and_gaps_are_named() -> None:
    s = CallSession("c1")
    first = chunk(0, audio=b64(pcm16(tone(0.5))))
    assert s.receive(first) is True and s.audio_seconds == 0.5 and s.next_seq == 1
    assert s.receive(first) is False and s.audio_seconds == 0.5 and s.next_seq == 1  # a retry
    err = reason_of(lambda: s.receive(chunk(2, audio=b64(pcm16(tone(0.5))))))
    assert err.reason == "sequence_gap" and err.status == 409 and err.field == "seq"
    assert "expected chunk seq 1, got 2" in err.message
    err = reason_of(lambda: s.receive(chunk(0, audio=b64(pcm16(tone(0.5, seed=1))))))
    assert err.reason == "out_of_order" and "different content" in err.message
    assert s.receive(chunk(1, segments=[seg("喂", 0, 1)])) is True and s.segments_received == 1
    err = reason_of(lambda: s.receive(chunk(2, call_id="other", segments=[seg("喂", 0, 1)])))
    assert err.reason == "invalid_request" and err.field == "call_id"
    s.close()
    err = reason_of(lambda: s.receive(chunk(2, segments=[seg("喂", 0, 1)])))
    assert err.reason == "closed_call" and err.status == 409


def test_a_bad_chunk_does_not_advance_the_sequence() -> None:
    s = CallSession("c1")
    assert reason_of(lambda: s.receive(chunk(0, audio="!!"))).reason == "invalid_base64"
    assert s.next_seq == 0 and s.receive(chunk(0, audio=b64(b"\x00\x00")))


def test_audio_and_transcript_memory_is_bounded_to_the_most_recent_part() -> None:
    limits = SessionLimits(clip_seconds=1.0, max_clips=2, max_transcript_chars=40)
    s = CallSession("c1", limits=limits)
    audio = tone(5.0, 2)
    step = RATE // 2 + 123  # chunk edges that do not line up with the window
    for i, start in enumerate(range(0, audio.shape[0], step)):
        s.receive(chunk(i, audio=b64(pcm16(audio[start : start + step])), channels=2))
    assert s.audio_seconds == 5.0 and s.held_audio_seconds == 2.0
    np.testing.assert_array_equal(s.audio(), audio[-2 * RATE :].astype(np.float32) / 32768)
    assert [c.shape for c in s.clips()] == [(RATE, 2), (RATE, 2)]
    # a single chunk longer than the window keeps its tail
    s.receive(chunk(s.next_seq, audio=b64(pcm16(tone(3.0, 2, seed=5))), channels=2))
    assert s.held_audio_seconds == 2.0
    for i in range(20):
        s.receive(chunk(s.next_seq, segments=[seg(f"句子{i:02d}", 10 + i, 11 + i)]))
    assert len(s.transcript()) <= 40 and s.transcript().endswith("左：句子19")
    assert s.segments_received == 20 and s.transcript_end == 30.0 and s.audio_time == 30.0


def test_mono_audio_is_kept_on_both_channels_as_training_reads_it() -> None:
    s = CallSession("c1")
    mono = tone(0.2)
    s.receive(chunk(0, audio=b64(pcm16(mono))))
    kept = s.audio()
    assert kept.shape == (3200, 2)
    np.testing.assert_array_equal(kept[:, 0], kept[:, 1])


def test_registry_limits_lookup_and_expiry() -> None:
    now = [0.0]
    registry = CallRegistry(max_calls=2, ttl_seconds=10, clock=lambda: now[0])
    a = registry.open(OpenCall(call_id="a"))
    registry.open(OpenCall(call_id="b"))
    assert len(registry) == 2
    assert reason_of(lambda: registry.open(OpenCall(call_id="c"))).reason == "too_many_calls"
    assert reason_of(lambda: registry.open(OpenCall(call_id="a"))).reason == "call_exists"
    assert reason_of(lambda: registry.get("zzz")).status == 404
    a.close()
    assert reason_of(lambda: registry.get("a")).reason == "closed_call"
    assert registry.get("a", open_only=False) is a
    registry.open(OpenCall(call_id="c"))  # a closed call frees its place
    now[0] = 5.0
    registry.get("c").touch()
    now[0] = 12.0
    abandoned = registry.expire()
    assert [s.call_id for s in abandoned] == ["b"] and abandoned[0].closed
    assert reason_of(lambda: registry.get("a")).reason == "unknown_call"  # forgotten after the ttl
    assert registry.get("c").call_id == "c"


# ---------------------------------------------------------------------------------------------- policy


def test_policy_config_is_validated() -> None:
    with pytest.raises(ValueError, match="never evaluates"):
        DecisionPolicy(every_seconds=None, on_turn=False)
    with pytest.raises(ValueError, match="chain_scene"):
        DecisionPolicy(chain_scene=True, ask_scene="until_known")
    with pytest.raises(ValueError):
        DecisionPolicy(alert_threshold=1.5)


def test_evaluates_every_n_seconds_of_new_audio() -> None:
    policy = DecisionPolicy(every_seconds=2.0, on_turn=False, ask_scene="never")
    session, engine = CallSession("c1"), Scripted()
    decisions = feed_all(policy, session, audio_chunks(7.0, 0.5), engine)
    assert [d.audio_time for d in decisions] == [2.0, 4.0, 6.0]
    assert [d.seq for d in decisions] == [3, 7, 11]
    assert all(r.round is Round.FRAUD and len(r.audios) == 1 for r in engine.requests)
    assert engine.requests[0].audios[0].shape == (2 * RATE, 2)
    assert "<audio>" in engine.requests[0].messages[-1]["content"]
    assert all(d.is_fraud is False and not d.alert and d.conversation_stage is Stage.LATE for d in decisions)


def test_evaluates_at_each_finished_turn_after_min_turns() -> None:
    policy = DecisionPolicy(every_seconds=None, on_turn=True, min_turns=2, ask_scene="never")
    session, engine = CallSession("c1"), Scripted()
    decisions = feed_all(policy, session, turn_chunks(4), engine)
    assert [d.seq for d in decisions] == [1, 2, 3]
    transcripts = [r.messages[-1]["content"] for r in engine.requests]
    assert "左：第0句话\n右：第1句话" in transcripts[0] and "第2句话" not in transcripts[0]
    assert "右：第3句话" in transcripts[2]


def test_alert_needs_the_threshold_then_round_three_names_the_type() -> None:
    policy = DecisionPolicy(alert_threshold=0.6, every_seconds=None, min_turns=1, ask_scene="never")
    session = CallSession("c1")
    engine = Scripted([fraud_answer(True, 0.5), fraud_answer(True, 0.9)])
    first = feed_all(policy, session, turn_chunks(1), engine)
    assert [(d.round, d.is_fraud, d.alert) for d in first] == [(Round.FRAUD, True, False)]
    second = run(policy.feed(session, turn_chunks(2)[1], engine)).decisions
    assert [d.round for d in second] == [Round.FRAUD, Round.FRAUD_TYPE]
    alert, kind = second
    assert alert.alert and alert.confidence == 0.9 and session.first_alert_time == 4.0
    assert kind.fraud_type == FRAUD_TYPE and kind.is_fraud is True and kind.tokens == 42 and not kind.alert
    assert kind.label == FRAUD_TYPE and alert.label is True
    # round 3 continues the is_fraud conversation with the model's own answer
    fraud_request, type_request = engine.requests[-2:]
    assert type_request.messages[:-2] == fraud_request.messages
    assert type_request.messages[-2] == {"role": "assistant", "content": fraud_answer(True, 0.9)}
    prompts = builtin_prompts("zh")
    assert type_request.messages[-1]["content"] == prompts.user_prompt(
        Round.FRAUD_TYPE, "realtime", with_call=False
    )


def test_a_missing_confidence_never_alerts_above_zero_threshold() -> None:
    policy = DecisionPolicy(alert_threshold=0.1, every_seconds=None, min_turns=1, ask_scene="never")
    no_conf = '<think>t</think><answer>{"conversation_stage": "late_stage", "is_fraud": true}</answer>'
    session, engine = CallSession("c1"), Scripted(no_conf)
    [d] = feed_all(policy, session, turn_chunks(1), engine)
    assert d.is_fraud is True and d.confidence is None and not d.alert and d.problems


def test_stop_after_alert_or_keep_monitoring() -> None:
    chunks = turn_chunks(5)
    stop = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never")
    session, engine = CallSession("c1"), Scripted(fraud_answer(True, 0.95))
    decisions = feed_all(stop, session, chunks, engine)
    assert engine.rounds() == [Round.FRAUD, Round.FRAUD_TYPE] and session.stopped
    assert session.next_seq == 5 and len(decisions) == 2  # later chunks are accepted, not evaluated

    keep = stop.model_copy(update={"keep_monitoring_after_alert": True})
    session, engine = CallSession("c1"), Scripted(fraud_answer(True, 0.95))
    feed_all(keep, session, chunks, engine)
    # round 3 only until the type is known; every turn is still evaluated
    assert engine.rounds() == [
        Round.FRAUD,
        Round.FRAUD_TYPE,
        Round.FRAUD,
        Round.FRAUD,
        Round.FRAUD,
        Round.FRAUD,
    ]
    assert session.alerts == 5 and session.first_alert_time == 2.0


def test_budget_caps_model_calls_per_call() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, max_model_calls=5, ask_scene="always")
    session, engine = CallSession("c1"), Scripted()
    feed_all(policy, session, turn_chunks(6), engine)
    # scene + is_fraud batched twice, then a single is_fraud (no room for the scene), then nothing
    assert [[r.round for r in b] for b in engine.batches] == [
        [Round.FRAUD, Round.SCENE],
        [Round.FRAUD, Round.SCENE],
        [Round.FRAUD],
    ]
    assert session.model_calls == 5 and policy.due(session) is None and policy.budget_left(session) == 0
    # the scene is asked until known, then no more
    until = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="until_known")
    session, engine = CallSession("c1"), Scripted()
    decisions = feed_all(until, session, turn_chunks(3), engine)
    assert engine.rounds() == [Round.FRAUD, Round.SCENE, Round.FRAUD, Round.FRAUD]
    assert all(d.scene == SCENE for d in decisions)


def test_a_call_past_the_transcript_window_is_not_asked_the_same_prompt_again() -> None:
    # each line "左：第i句话" is 6 characters, joined by newlines: the first two turns and the start of the third
    # fill a 16-character window; after that the prompt cannot change
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never", max_transcript_chars=16)
    session, engine = CallSession("c1"), Scripted(fraud_answer(False))
    feed_all(policy, session, turn_chunks(6), engine)
    transcripts = [r.messages[-1]["content"] for r in engine.requests]
    assert len(transcripts) == 3 and len(set(transcripts)) == 3  # turns 1, 2, 3; turns 4-6 change nothing
    assert session.evaluated_segments == 6 and not policy.pending(session)
    _, verdict = run(policy.close(session, engine))
    assert len(engine.requests) == 3 and verdict.is_fraud is False  # nothing new for the close either
    # without a window every turn is new to the model
    whole = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never")
    session, engine = CallSession("c1"), Scripted(fraud_answer(False))
    feed_all(whole, session, turn_chunks(6), engine)
    assert len(engine.requests) == 6


def test_the_scene_is_asked_of_calls_the_model_found_normal() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="when_normal")
    session, engine = CallSession("c1"), Scripted(fraud_answer(False))
    decisions = feed_all(policy, session, turn_chunks(3), engine)
    # turn 1: is_fraud alone (normal); turn 2: the scene too, now known; turn 3: is_fraud alone again
    assert engine.rounds() == [Round.FRAUD, Round.FRAUD, Round.SCENE, Round.FRAUD]
    assert decisions[-1].scene == SCENE
    # a fraud call is never asked its scene: no model call spent on a round training never asked of one
    session, engine = CallSession("c2"), Scripted(fraud_answer(True, 0.9))
    feed_all(policy, session, turn_chunks(3, "c2"), engine)
    assert Round.SCENE not in engine.rounds() and session.alerts == 1


def test_duplicate_chunk_returns_the_decisions_already_made() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never")
    session, engine = CallSession("c1"), Scripted()
    c = turn_chunks(1)[0]
    first = run(policy.feed(session, c, engine))
    again = run(policy.feed(session, c, engine))
    assert again.duplicate and not first.duplicate and again.decisions == first.decisions
    assert len(engine.requests) == 1 and session.model_calls == 1


def test_insufficient_and_invalid_answers_are_read_as_null() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="always")
    insufficient = format_answer(
        Round.FRAUD, None, stage="early_stage", reason="信息不足", confidence=0.3, think="t"
    )
    session = CallSession("c1")
    engine = Scripted(
        insufficient, scene=format_answer(Round.SCENE, "火星旅行", stage="early_stage", think="t")
    )
    scene, fraud = feed_all(policy, session, turn_chunks(1), engine)
    assert fraud.insufficient and fraud.is_fraud is None and fraud.conversation_stage is Stage.EARLY
    assert scene.scene is None and any("火星旅行" in p for p in scene.problems) and session.scene is None
    garbage = Scripted("no tags at all")
    [d] = feed_all(
        policy.model_copy(update={"ask_scene": "never"}), CallSession("c1"), turn_chunks(1), garbage
    )
    assert d.is_fraud is None and d.problems and not d.alert


def test_final_verdict_on_close() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="until_known", alert_threshold=0.8)
    session = CallSession("c1")
    engine = Scripted([fraud_answer(False, 0.7), fraud_answer(True, 0.85)])
    feed_all(policy, session, turn_chunks(1), engine)
    session.receive(turn_chunks(2)[1])  # arrives, not yet evaluated: close evaluates it
    with pytest.raises(RequestError, match="missing chunks") as info:
        run(policy.close(session, engine, last_seq=4))
    assert info.value.reason == "sequence_gap" and info.value.field == "last_seq"
    final, verdict = run(policy.close(session, engine, last_seq=1))
    assert [d.round for d in final] == [Round.FRAUD, Round.FRAUD_TYPE] and session.closed
    assert verdict.is_fraud and verdict.fraud_type == FRAUD_TYPE and verdict.scene == SCENE
    assert verdict.confidence == 0.85 and verdict.first_alert_time == 4.0 and verdict.alerts == 1
    assert (
        verdict.decisions == len(session.decisions) == 4 and verdict.model_calls == 4 and verdict.chunks == 2
    )
    assert run(policy.close(session, engine)) == ([], verdict)  # closing again changes nothing

    normal = CallSession("c2")
    engine = Scripted(fraud_answer(False, 0.7))
    feed_all(policy, normal, turn_chunks(2, "c2"), engine)
    _, verdict = run(policy.close(normal, engine))
    assert not verdict.is_fraud and verdict.fraud_type is None and verdict.confidence == 0.7
    assert verdict.first_alert_time is None and verdict.audio_seconds == 4.0
    # fraud below the threshold: a normal verdict, confident in it only as far as the model doubted fraud
    weak = CallSession("c3")
    engine = Scripted(fraud_answer(True, 0.6))
    feed_all(policy, weak, turn_chunks(1, "c3"), engine)
    _, verdict = run(policy.close(weak, engine))
    assert not verdict.is_fraud and verdict.confidence == pytest.approx(0.4)


def test_engine_errors_leave_the_content_to_the_next_evaluation() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never")
    session = CallSession("c1")

    async def wrong_count(requests: Sequence[EngineRequest]) -> list[str]:
        return []

    with pytest.raises(EngineError):
        run(policy.feed(session, turn_chunks(1)[0], wrong_count))
    assert not session.evaluating and policy.due(session) == "turn"
    assert feed_all(policy, session, turn_chunks(2)[1:], Scripted())[0].seq == 1


def test_chained_scene_round_feeds_the_is_fraud_round() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, chain_scene=True, ask_scene="always")
    session, engine = CallSession("c1"), Scripted()
    scene, fraud = feed_all(policy, session, turn_chunks(1), engine)
    assert [len(b) for b in engine.batches] == [1, 1]
    scene_req, fraud_req = engine.requests
    assert fraud_req.messages[: len(scene_req.messages)] == scene_req.messages
    assert fraud_req.messages[len(scene_req.messages)] == {"role": "assistant", "content": engine.scene}
    assert fraud.scene == SCENE and scene.scene == SCENE


def test_language_and_modality_per_call() -> None:
    policy = DecisionPolicy(every_seconds=1.0, min_turns=0, ask_scene="never")
    session = CallSession.from_open(OpenCall(call_id="c1", language="en", modality="text"))
    engine = Scripted()
    feed_all(
        policy,
        session,
        [chunk(0, audio=b64(pcm16(tone(1.0)))), chunk(1, segments=[seg("hello", 0, 1)])],
        engine,
    )
    [request] = engine.requests  # the audio alone gave nothing to a text call
    assert request.audios == () and "Here is the transcript" in request.messages[-1]["content"]
    assert request.messages[0]["content"] == builtin_prompts("en").system


# ---------------------------------------------------- prompts identical to training's real-time prompts


def _fraud_call() -> CallRecord:
    lines = [
        ("left", "您好，我是工商银行客服，您的账户出现异常交易。"),
        ("right", "什么异常？我没有操作过。"),
        ("left", "系统显示您的卡在外地被盗刷，需要马上冻结。"),
        ("right", "那我应该怎么办？"),
        ("left", "请您把卡里的钱转到我们的安全账户。"),
        ("right", "安全账户是哪个？"),
        ("left", "我把账号发给您，另外请告诉我收到的验证码。"),
        ("right", "好的，我看一下。"),
    ]
    turns, t = [], 0.0
    for speaker, text in lines:
        turns.append(Turn(speaker=speaker, text=text, start=t, end=t + 9.0))
        t += 9.5
    return CallRecord(
        call_id="calls/fraud-1",
        source="test",
        turns=tuple(turns),
        labels=CallLabels(is_fraud=True, scene=SCENE, fraud_type=FRAUD_TYPE),
    )


def _training_rows(
    builder: RowBuilder, call: CallRecord, clips: Callable[[Any], Sequence[str]] | None = None
):
    [prefix] = [p for p in cut_prefixes(call, PrefixPolicy(per_stage=1)) if p.stage is Stage.LATE]
    sample = Sample(
        call=prefix.call,
        call_id=prefix.parent_id,
        stage=prefix.stage,
        audio_idx=prefix.turns,
        audio_length=prefix.end_s,
        clips=clips(prefix) if clips else (),
    )
    return prefix, builder.grpo_rows(sample)


def _gold_engine(rows: list[dict[str, Any]]) -> Scripted:
    """Answers each round with training's reference answer, so the later rounds' history is the same too."""
    # the assistant message before each row's last question is the previous round's reference answer
    answers: dict[Round, str] = {}
    for row in rows:
        msgs = row["messages"]
        if len(msgs) >= 3 and msgs[-2]["role"] == "assistant":
            asked_before = [r for r in rows if r["messages"] == msgs[:-2]]
            answers[Round(asked_before[0]["task"])] = msgs[-2]["content"]
    return Scripted(answers[Round.FRAUD], scene=answers.get(Round.SCENE), fraud_type=None)


@pytest.mark.parametrize("chain", [False, True])
def test_text_prompts_are_training_realtime_prompts(chain: bool) -> None:
    call = _fraud_call()
    builder = RowBuilder(builtin_prompts("zh"), "realtime", "text", chain_scene=chain)
    prefix, rows = _training_rows(builder, call)
    policy = DecisionPolicy(chain_scene=chain, ask_scene="always", every_seconds=None, min_turns=0)
    session, engine = CallSession("calls/fraud-1"), _gold_engine(rows)
    segments = [seg(t.text, t.start, t.end, t.speaker) for t in prefix.call.turns]
    decisions = feed_all(policy, session, [chunk(0, "calls/fraud-1", segments=segments)], engine)
    served = {r.round.value: r.messages for r in engine.requests}
    trained = {row["task"]: row["messages"] for row in rows}
    assert served == trained
    assert decisions[-1].round is Round.FRAUD_TYPE and decisions[0].audio_time == prefix.end_s


def test_audio_prompts_and_clips_are_training_realtime_prompts(tmp_path: Path) -> None:
    call = _fraud_call()
    audio = tone(call.duration or 0.0, 2, seed=3).astype(np.float32) / 32768
    call = call.model_copy(update={"audio": str(write_wav(tmp_path / "call.wav", audio))})
    writer = ClipWriter(tmp_path / "dataset")
    builder = RowBuilder(builtin_prompts("zh"), "realtime", "audio")
    prefix, rows = _training_rows(builder, call, lambda p: writer(call, p.end_s, p.turns))
    trained_clips = [sf.read(tmp_path / "dataset" / c, dtype="float32")[0] for c in rows[0]["audios"]]
    assert len(trained_clips) == 2  # the prefix is longer than 30 s: two clips, two <audio> tags

    policy = DecisionPolicy(every_seconds=60.0, on_turn=False, ask_scene="always")
    session, engine = CallSession(call.call_id), _gold_engine(rows)
    pcm = np.round(audio * 32768).astype(np.int16)[: round(prefix.end_s * RATE)]
    step = RATE * 4
    chunks = [
        chunk(i, call.call_id, audio=b64(pcm16(pcm[s : s + step])), channels=2)
        for i, s in enumerate(range(0, pcm.shape[0], step))
    ]
    decisions = run(_feed_then_evaluate(policy, session, chunks, engine))
    served = {r.round.value: r.messages for r in engine.requests}
    assert served == {row["task"]: row["messages"] for row in rows}
    for request in engine.requests:
        assert len(request.audios) == 2
        for served_clip, trained_clip in zip(request.audios, trained_clips, strict=True):
            np.testing.assert_array_equal(served_clip, trained_clip)
    assert decisions[0].audio_time == pytest.approx(prefix.end_s)


async def _feed_then_evaluate(
    policy: DecisionPolicy, session: CallSession, chunks: list[Chunk], engine: Scripted
):
    for c in chunks:
        assert not (
            await policy.feed(session, c, engine)
        ).decisions  # every_seconds is longer than the prefix
    return await policy.evaluate(session, engine)


def test_no_round_three_without_budget() -> None:
    policy = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never", max_model_calls=1)
    session, engine = CallSession("c1"), Scripted(fraud_answer(True, 0.9))
    [d] = feed_all(policy, session, turn_chunks(3), engine)
    assert d.alert and engine.rounds() == [Round.FRAUD]
    _, verdict = run(policy.close(session, engine))
    assert verdict.is_fraud and verdict.fraud_type is None and verdict.model_calls == 1
