"""Per-call state of a live call, bounded in memory, and the registry of calls a detector watches.

Sequence numbers (`Chunk.seq`, from 0) make delivery idempotent:

- seq == next expected: a new chunk, accepted;
- seq <  next expected: a retry of a chunk already accepted; nothing is counted again. If the detector still
  remembers that chunk (the last `remember_chunks`) and the content differs, it is refused as `out_of_order`
  (two different chunks claim one number);
- seq >  next expected: `sequence_gap`, naming the expected and the received number; the client resends
  from the expected one.

Memory per call is bounded: the audio kept is the most recent `clip_seconds * max_clips` seconds (Qwen2-Audio
holds at most 30 s per clip, so a long prefix is several clips), the transcript the most recent
`max_transcript_chars` characters. Up to those bounds the model sees the whole call so far, as in training;
beyond them it sees the most recent part.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from teleguard.data.audio import split_clips
from teleguard.serve.chunks import ChunkLimits, DecodedChunk, decode_chunk
from teleguard.serve.protocol import SAMPLE_RATE, Chunk, Decision, OpenCall, RequestError, Segment, Verdict

Clock = Callable[[], float]
_MARKS = {"left": "左", "right": "右"}  # as CallRecord.transcript writes the channels (training's prompts)


class SessionLimits(BaseModel):
    """Memory bounds of one call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_seconds: float = Field(default=30.0, gt=0)  # one <audio> clip at most (Qwen2-Audio: 30 s)
    max_clips: int = Field(default=4, ge=1)  # audio kept: clip_seconds * max_clips, the most recent
    max_transcript_chars: int = Field(default=20_000, ge=1)  # transcript kept, the most recent turns
    remember_chunks: int = Field(default=64, ge=0)  # content digests kept to tell retries from conflicts

    @property
    def max_audio_seconds(self) -> float:
        return self.clip_seconds * self.max_clips


def render_segment(segment: Segment) -> str:
    """One transcript line as training writes it ("左：..." for the left channel); other speakers by name."""
    return f"{_MARKS.get(segment.speaker, segment.speaker)}：{segment.text}"


class _AudioWindow:
    """The most recent `max_samples` frames of stereo float32 audio, kept as a queue of blocks."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.blocks: deque[np.ndarray] = deque()
        self.held = 0

    def append(self, audio: np.ndarray) -> None:
        if audio.shape[0] >= self.max_samples:
            self.blocks.clear()
            self.blocks.append(audio[-self.max_samples :].copy())
            self.held = self.max_samples
            return
        self.blocks.append(audio)
        self.held += audio.shape[0]
        while self.held > self.max_samples:
            excess = self.held - self.max_samples
            first = self.blocks[0]
            if first.shape[0] <= excess:
                self.blocks.popleft()
                self.held -= first.shape[0]
            else:
                self.blocks[0] = first[excess:].copy()  # a copy, so the dropped samples are freed
                self.held -= excess

    def array(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros((0, 2), dtype=np.float32)
        return np.concatenate(list(self.blocks), axis=0)

    def clear(self) -> None:
        self.blocks.clear()
        self.held = 0


def chunk_digest(chunk: Chunk) -> bytes:
    """What tells a retry (same content) from a conflict (another chunk claiming the same seq)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (chunk.audio, chunk.wav, str(chunk.channels), str(chunk.sample_rate)):
        h.update(b"\x00" if part is None else b"\x01" + part.encode("utf-8", "surrogatepass"))
    for s in chunk.segments:
        h.update(s.model_dump_json().encode("utf-8", "surrogatepass"))
    return h.digest()


def closed_error(call_id: str, seq: int) -> RequestError:
    return RequestError("closed_call", f"call {call_id} is closed; chunk {seq} is refused", field="call_id")


def gap_error(call_id: str, seq: int, expected: int) -> RequestError:
    return RequestError(
        "sequence_gap",
        f"call {call_id}: expected chunk seq {expected}, got {seq}; resend from {expected}",
        field="seq",
    )


def conflict_error(call_id: str, seq: int) -> RequestError:
    return RequestError(
        "out_of_order",
        f"call {call_id}: chunk seq {seq} was already accepted with different content",
        field="seq",
    )


def unknown_error(call_id: str) -> RequestError:
    return RequestError("unknown_call", f"no call {call_id} is open; open it first", field="call_id")


def exists_error(call_id: str) -> RequestError:
    return RequestError(
        "call_exists", f"call {call_id} is already open (or recently closed)", field="call_id"
    )


def full_error(max_calls: int) -> RequestError:
    return RequestError(
        "too_many_calls", f"the detector is watching {max_calls} calls, its limit; retry later"
    )


class PolicyState(BaseModel):
    """What the policy has written into a call: a shared store keeps it beside the call's content, so that an
    evaluation on another replica goes on from where the last one left off."""

    model_config = ConfigDict(extra="forbid")

    model_calls: int = 0
    alerts: int = 0
    first_alert_time: float | None = None
    scene: str | None = None
    is_fraud: bool | None = None
    fraud_type: str | None = None
    stopped: bool = False
    evaluated_time: float = 0.0
    evaluated_segments: int = 0
    evaluated_window: str | None = None


class CallSession:
    """One live call: its sequence position, bounded audio and transcript, activity time and detection state.

    The detection fields (decisions, model calls, alerts, the call's picture) are written by
    `teleguard.serve.policy.DecisionPolicy`; the session only keeps them.
    """

    def __init__(
        self,
        call_id: str,
        *,
        language: Literal["zh", "en"] | None = None,
        modality: Literal["auto", "audio", "text"] = "auto",
        metadata: dict[str, object] | None = None,
        limits: SessionLimits | None = None,
        chunk_limits: ChunkLimits | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.call_id, self.language, self.modality = call_id, language, modality
        self.metadata = dict(metadata or {})
        self.limits = limits or SessionLimits()
        self.chunk_limits = chunk_limits or ChunkLimits()
        self.clock = clock
        self.opened_at = self.last_activity = clock()
        self.closed = False
        # sequence
        self.next_seq = 0
        self._digests: OrderedDict[int, bytes] = OrderedDict()
        # content
        self._audio = _AudioWindow(round(self.limits.max_audio_seconds * SAMPLE_RATE))
        self._audio_missing = False  # a store's copy made without the audio blocks (only their size)
        self._segments: deque[str] = deque()
        self._transcript_chars = 0
        self.audio_samples = 0  # every frame ever received (the window holds the last ones)
        self.transcript_end = 0.0  # latest segment end, seconds of call audio
        self.segments_received = 0
        # detection state, written by the policy
        self.decisions: list[Decision] = []
        self.model_calls = 0
        self.alerts = 0
        self.first_alert_time: float | None = None
        self.scene: str | None = None
        self.is_fraud: bool | None = None
        self.fraud_type: str | None = None
        self.stopped = False  # no more evaluations (alerted and not monitoring further)
        self.evaluating = False  # an evaluation is in flight
        self.evaluated_time = 0.0  # audio_time of the last evaluation
        self.evaluated_segments = 0  # segments_received at the last evaluation
        self.evaluated_window: str | None = None  # the transcript the model saw at the last evaluation
        self.verdict: Verdict | None = None

    @classmethod
    def from_open(
        cls,
        request: OpenCall,
        *,
        limits: SessionLimits | None = None,
        chunk_limits: ChunkLimits | None = None,
        clock: Clock = time.monotonic,
    ) -> CallSession:
        return cls(
            request.call_id,
            language=request.language,
            modality=request.modality,
            metadata=request.metadata,
            limits=limits,
            chunk_limits=chunk_limits,
            clock=clock,
        )

    # --- chunks ------------------------------------------------------------------------------------------

    def check_seq(self, chunk: Chunk) -> bool:
        """True for the next chunk, False for a retry of an accepted one; RequestError otherwise."""
        if self.closed:
            raise closed_error(self.call_id, chunk.seq)
        if chunk.call_id != self.call_id:
            raise RequestError(
                "invalid_request",
                f"chunk for call {chunk.call_id} sent to call {self.call_id}",
                field="call_id",
            )
        if chunk.seq > self.next_seq:
            raise gap_error(self.call_id, chunk.seq, self.next_seq)
        if chunk.seq < self.next_seq:
            known = self._digests.get(chunk.seq)
            if known is not None and known != chunk_digest(chunk):
                raise conflict_error(self.call_id, chunk.seq)
            return False
        return True

    def receive(self, chunk: Chunk) -> bool:
        """Check, decode and add a chunk. True if it was new, False for a retry (nothing changes)."""
        if not self.check_seq(chunk):
            self.touch()
            return False
        decoded = decode_chunk(chunk, self.chunk_limits)
        self.add(decoded)
        self.next_seq += 1
        if self.limits.remember_chunks:
            self._digests[chunk.seq] = chunk_digest(chunk)
            while len(self._digests) > self.limits.remember_chunks:
                self._digests.popitem(last=False)
        return True

    def add(self, decoded: DecodedChunk) -> None:
        """Append decoded content (no sequence check: `receive` is the way in for client chunks)."""
        if decoded.audio is not None:
            audio = decoded.audio
            if audio.shape[1] == 1:
                audio = np.repeat(audio, 2, axis=1)  # mono on both channels, as training reads mono audio
            self._audio.append(audio)
            self.audio_samples += audio.shape[0]
        for segment in decoded.segments:
            line = render_segment(segment)
            self._segments.append(line)
            self._transcript_chars += len(line) + 1
            self.segments_received += 1
            self.transcript_end = max(self.transcript_end, segment.end)
        while len(self._segments) > 1 and self._transcript_chars > self.limits.max_transcript_chars:
            self._transcript_chars -= len(self._segments.popleft()) + 1
        self.touch()

    # --- what the call holds -----------------------------------------------------------------------------

    @property
    def audio_seconds(self) -> float:
        """Seconds of call audio received."""
        return self.audio_samples / SAMPLE_RATE

    @property
    def audio_time(self) -> float:
        """How far into the call the detector has heard or read: the clock decisions are stamped with."""
        return max(self.audio_seconds, self.transcript_end)

    @property
    def has_audio(self) -> bool:
        return self._audio.held > 0

    @property
    def has_transcript(self) -> bool:
        return bool(self._segments)

    @property
    def held_audio_seconds(self) -> float:
        return self._audio.held / SAMPLE_RATE

    def audio(self) -> np.ndarray:
        """The audio kept: float32 of shape (samples, 2), 16 kHz, the most recent part of the call."""
        if self._audio_missing:
            raise RuntimeError(f"call {self.call_id}: this copy was loaded without its audio")
        return self._audio.array()

    def clips(self) -> list[np.ndarray]:
        """The audio kept as the fewest near-equal clips of at most `clip_seconds` (as training cuts them)."""
        return split_clips(self.audio(), SAMPLE_RATE, self.limits.clip_seconds)

    def transcript(self) -> str:
        """The transcript kept, one turn per line, as training writes it (CallRecord.transcript)."""
        return "\n".join(self._segments)

    def decisions_for(self, seq: int) -> list[Decision]:
        return [d for d in self.decisions if d.seq == seq]

    # --- a copy of a call kept elsewhere (teleguard.serve.store) ---------------------------------------------

    def policy_state(self) -> PolicyState:
        return PolicyState(**{name: getattr(self, name) for name in PolicyState.model_fields})

    def set_policy_state(self, state: PolicyState) -> None:
        for name in PolicyState.model_fields:
            setattr(self, name, getattr(state, name))

    def restore(
        self,
        *,
        next_seq: int,
        audio_samples: int,
        audio_held: int,
        audio_blocks: list[np.ndarray] | None,
        lines: list[str],
        transcript_end: float,
        segments_received: int,
    ) -> None:
        """Set the call's content as a store holds it. The blocks go through the same window as received
        chunks, so the audio kept is the same; without blocks (None) only how much is held is known."""
        self.next_seq, self.audio_samples = next_seq, audio_samples
        self.transcript_end, self.segments_received = transcript_end, segments_received
        self._audio.clear()
        if audio_blocks is None:
            self._audio.held = min(audio_held, self._audio.max_samples)
            self._audio_missing = self._audio.held > 0
        else:
            for block in audio_blocks:
                self._audio.append(np.repeat(block, 2, axis=1) if block.shape[1] == 1 else block)
            self._audio_missing = False
        self._segments = deque(lines)
        self._transcript_chars = sum(len(line) + 1 for line in lines)

    # --- lifetime ----------------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = self.clock()

    def idle_seconds(self, now: float | None = None) -> float:
        return (self.clock() if now is None else now) - self.last_activity

    def close(self) -> None:
        """Mark the call closed and free its audio and transcript; the detection state stays for the verdict."""
        self.closed = True
        self._audio.clear()
        self._segments.clear()
        self._transcript_chars = 0
        self._digests.clear()
        self._audio_missing = False
        self.touch()


class CallRegistry:
    """The calls a detector watches: opening (bounded count), lookup, and expiry of idle calls.

    Closed calls stay known for `ttl_seconds` (late chunks get `closed_call`, not `unknown_call`).
    """

    def __init__(
        self,
        *,
        max_calls: int = 1000,
        ttl_seconds: float = 300.0,
        limits: SessionLimits | None = None,
        chunk_limits: ChunkLimits | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_calls < 1 or ttl_seconds <= 0:
            raise ValueError(f"max_calls must be >= 1 and ttl_seconds > 0, got {max_calls} and {ttl_seconds}")
        self.max_calls, self.ttl_seconds = max_calls, ttl_seconds
        self.limits, self.chunk_limits, self.clock = limits, chunk_limits, clock
        self._sessions: dict[str, CallSession] = {}

    def __len__(self) -> int:
        """Open calls."""
        return sum(not s.closed for s in self._sessions.values())

    def open(self, request: OpenCall) -> CallSession:
        if request.call_id in self._sessions:
            raise exists_error(request.call_id)
        if len(self) >= self.max_calls:
            raise full_error(self.max_calls)
        session = CallSession.from_open(
            request, limits=self.limits, chunk_limits=self.chunk_limits, clock=self.clock
        )
        self._sessions[request.call_id] = session
        # closed calls are kept only to answer late chunks: never more of them than open ones allowed
        closed = [cid for cid, s in self._sessions.items() if s.closed]
        for cid in closed[: max(0, len(closed) - self.max_calls)]:
            del self._sessions[cid]
        return session

    def get(self, call_id: str, *, open_only: bool = True) -> CallSession:
        """The call's session; `unknown_call` if there is none, `closed_call` if closed and `open_only`."""
        session = self._sessions.get(call_id)
        if session is None:
            raise unknown_error(call_id)
        if open_only and session.closed:
            raise RequestError("closed_call", f"call {call_id} is closed", field="call_id")
        return session

    def expire(self, now: float | None = None) -> list[CallSession]:
        """Forget calls idle for `ttl_seconds`. Returns the open ones among them (now closed), for verdicts."""
        now = self.clock() if now is None else now
        abandoned = []
        for call_id, session in list(self._sessions.items()):
            if session.idle_seconds(now) < self.ttl_seconds or session.evaluating:
                continue
            if not session.closed:
                session.close()
                abandoned.append(session)
            del self._sessions[call_id]
        return abandoned

    def idle(self, now: float | None = None) -> list[str]:
        """Forget closed calls idle for `ttl_seconds`; the open ones idle as long (none evaluating), to expire."""
        now = self.clock() if now is None else now
        out = []
        for call_id, session in list(self._sessions.items()):
            if session.idle_seconds(now) < self.ttl_seconds or session.evaluating:
                continue
            if session.closed:
                del self._sessions[call_id]
            else:
                out.append(call_id)
        return out

    def forget(self, call_id: str) -> None:
        self._sessions.pop(call_id, None)

    def sessions(self) -> list[CallSession]:
        return list(self._sessions.values())
