"""Replaying a call against a running detector, as a live client would stream it (`teleguard stream`).

A call becomes a `CallScript`: the chunks a live client would send and when (seconds of call time):

- a transcript (a teleguard call record, a TeleAntiFraud dialogue): one chunk per finished turn, sent when the
  turn ends (turn times are estimated from a speech rate where the source has none, teleguard.data.timing);
- an audio file (WAV/MP3/FLAC, read with teleguard.data.audio at 16 kHz stereo): PCM16 chunks of
  `chunk_seconds`, each sent when its audio has been "spoken".

`replay_call` streams a script to the server over the WebSocket route (default) or the REST call routes, in
real time (`speed` 1), faster (`speed` X) or as fast as possible (`speed` 0), and returns every decision, the
verdict and client-side timings: each chunk's round trip (send to ack; the ack is sent once any evaluation the
chunk triggered is done) and each decision's latency (send of the message that triggered it to its arrival).
`iter_replay` yields the same events as they arrive. Anything the server refuses, and any connection problem,
is a `StreamError` carrying the server's reason, status and message.

Delivery follows the protocol (docs/serving.md): chunks are numbered from 0, the WebSocket client sends them on
schedule without waiting for answers and closes the call once every chunk is acknowledged; chunks listed in
`resend` are sent a second time once acknowledged (a client that lost an ack): the server answers
`duplicate: true` and repeats the decisions, which the client recognizes and does not count again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from teleguard.data.records import CallLabels, CallRecord
from teleguard.data.timing import estimate_times

Transport = Literal["ws", "http"]
STREAM_ROUTE = "/v1/calls/stream"
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus"})
RATE = 16_000


class CallSourceError(ValueError):
    """The call to replay cannot be read (missing file, unknown format, no such call in the file)."""


class StreamError(Exception):
    """The server refused a message (`status` 4xx/5xx, its `reason` and message) or could not be reached
    (`reason` "connection_error", no status)."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        call_id: str | None = None,
        seq: int | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status
        self.call_id, self.seq, self.body = call_id, seq, body or {}

    def __str__(self) -> str:
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.reason}: {self.message}"


# --- what to send ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk's content (Chunk fields other than call_id and seq) and when a live client sends it."""

    at: float  # seconds of call time
    fields: dict[str, Any]


@dataclass(frozen=True)
class CallScript:
    """A call as a live client streams it."""

    chunks: tuple[PlannedChunk, ...]
    source_id: str  # the record's call id, or the audio file's name
    kind: Literal["transcript", "audio"]
    labels: CallLabels | None = None  # the source's labels, when it has them
    language: Literal["zh", "en"] | None = None
    duration: float = 0.0  # seconds of call time

    @property
    def modality(self) -> Literal["text", "audio"]:
        return "text" if self.kind == "transcript" else "audio"


def transcript_script(record: CallRecord, *, language: Literal["zh", "en"] | None = None) -> CallScript:
    """One chunk per finished turn (speaker, text, start, end), sent at the turn's end."""
    if not record.turns:
        raise CallSourceError(f"call {record.call_id} has no transcript")
    timed = estimate_times(record)
    chunks = tuple(
        PlannedChunk(
            at=float(t.end or 0.0),
            fields={"segments": [{"speaker": t.speaker, "text": t.text, "start": t.start, "end": t.end}]},
        )
        for t in timed.turns
    )
    return CallScript(
        chunks,
        record.call_id,
        "transcript",
        record.labels,
        language,
        chunks[-1].at,
    )


def audio_script(
    audio: np.ndarray, *, source_id: str, chunk_seconds: float = 1.0, labels: CallLabels | None = None
) -> CallScript:
    """PCM16 stereo chunks of `chunk_seconds` from float32 audio of shape (samples, 2) at 16 kHz."""
    if chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    if audio.ndim != 2 or audio.shape[1] != 2 or audio.shape[0] == 0:
        raise CallSourceError(f"{source_id}: expected non-empty stereo audio, got shape {audio.shape}")
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    step = max(1, round(chunk_seconds * RATE))
    chunks = tuple(
        PlannedChunk(
            at=min(start + step, pcm.shape[0]) / RATE,
            fields={
                "audio": base64.b64encode(pcm[start : start + step].tobytes()).decode("ascii"),
                "channels": 2,
            },
        )
        for start in range(0, pcm.shape[0], step)
    )
    return CallScript(chunks, source_id, "audio", labels, None, pcm.shape[0] / RATE)


def _file_format(path: Path) -> str:
    """ "teleguard" or "dialogues", from the first JSON object in the file."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CallSourceError(f"{path}: the first line is not JSON ({err.msg})") from None
                if isinstance(row, dict) and "labels" in row and ("turns" in row or "audio" in row):
                    return "teleguard"
                if isinstance(row, dict) and ("left" in row or "right" in row):
                    return "dialogues"
                raise CallSourceError(
                    f"{path}: neither a teleguard call record (turns, labels) nor a TeleAntiFraud dialogue "
                    "(left, right) on its first line"
                )
    raise CallSourceError(f"{path}: the file is empty")


def load_record(path: Path, *, index: int | None = None, call_id: str | None = None) -> CallRecord:
    """One call from a teleguard calls JSONL or a TeleAntiFraud dialogue file: by `call_id` (the record's id,
    or a dialogue's tts_id), else by 0-based `index` (default 0)."""
    from teleguard.data.ingest import IngestError, ingest

    try:
        calls, report = ingest([path], _file_format(path), on_error="skip")  # type: ignore[arg-type]
    except (IngestError, OSError) as err:
        raise CallSourceError(f"{path}: {err}") from None
    if not calls:
        problems = "; ".join(str(r) for r in report.rejected[:3])
        raise CallSourceError(f"{path}: no readable call ({problems or 'no rows'})")
    if call_id is not None:
        found = [c for c in calls if c.call_id == call_id or c.call_id.rpartition("/")[2] == call_id]
        if not found:
            raise CallSourceError(f"{path}: no call with id {call_id!r} among {len(calls)} calls")
        return found[0]
    index = index or 0
    if not -len(calls) <= index < len(calls):
        raise CallSourceError(f"{path}: --index {index} is out of range: the file holds {len(calls)} calls")
    return calls[index]


def load_call(
    path: Path,
    *,
    index: int | None = None,
    call_id: str | None = None,
    chunk_seconds: float = 1.0,
    language: Literal["zh", "en"] | None = None,
) -> CallScript:
    """The script of a call file: an audio file by its suffix, else a transcript (JSON lines)."""
    if not path.is_file():
        raise CallSourceError(f"{path}: no such file")
    if path.suffix.lower() in AUDIO_SUFFIXES:
        from teleguard.data.audio import read_audio

        try:
            audio, _ = read_audio(path, rate=RATE)
        except Exception as err:  # libsndfile / audioread errors have no common base
            raise CallSourceError(f"{path}: not readable audio ({type(err).__name__}: {err})") from None
        return audio_script(audio, source_id=path.name, chunk_seconds=chunk_seconds)
    return transcript_script(load_record(path, index=index, call_id=call_id), language=language)


# --- what comes back ---------------------------------------------------------------------------------------


@dataclass
class ChunkTiming:
    """One chunk as the client saw it; times in seconds since the replay started."""

    seq: int
    sent_at: float
    acked_at: float | None = None
    resent: bool = False  # sent a second time (a deliberate retry)
    duplicate_acked: bool = False  # the server answered the resend with duplicate: true

    @property
    def round_trip_s(self) -> float | None:
        return None if self.acked_at is None else self.acked_at - self.sent_at


@dataclass(frozen=True)
class ReceivedDecision:
    decision: dict[str, Any]  # the Decision as the server sent it
    received_at: float  # seconds since the replay started
    latency_s: float  # client-observed: from sending the message that triggered it to its arrival
    on_close: bool  # triggered by the close (what arrived since the last evaluation)


@dataclass(frozen=True)
class ReplayEvent:
    """What arrived: "opened", "ack", "decision" or "verdict", with its body and when (since the start)."""

    kind: str
    data: dict[str, Any]
    at: float
    latency_s: float | None = None  # ack: the chunk's round trip; decision: its client-observed latency


@dataclass
class ReplayResult:
    call_id: str
    transport: Transport
    chunks: list[ChunkTiming] = field(default_factory=list)
    decisions: list[ReceivedDecision] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    repeated_decisions: int = 0  # decisions the server repeated for resent chunks (not counted again)
    close_round_trip_s: float | None = None
    wall_s: float = 0.0

    @property
    def evaluations(self) -> int:
        """Evaluations the server ran for this call (each answers the is_fraud round once)."""
        return sum(1 for d in self.decisions if d.decision.get("round") == "is_fraud")

    @property
    def model_invocations(self) -> int:
        """Engine invocations behind the decisions: one per evaluation (scene and is_fraud go as one batch),
        one more for each fraud-type round (asked after an alert)."""
        return self.evaluations + sum(1 for d in self.decisions if d.decision.get("round") == "fraud_type")


def _decision_key(decision: dict[str, Any]) -> str:
    return json.dumps(decision, sort_keys=True, ensure_ascii=False)


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    if base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    elif base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif not base.startswith(("ws://", "wss://")):
        raise StreamError(
            "invalid_url", f"the server URL must start with http(s):// or ws(s)://, got {url!r}"
        )
    return base if base.endswith(STREAM_ROUTE) else base + STREAM_ROUTE


def _http_url(url: str) -> str:
    base = url.rstrip("/").removesuffix(STREAM_ROUTE)
    if base.startswith("ws://"):
        base = "http://" + base.removeprefix("ws://")
    elif base.startswith("wss://"):
        base = "https://" + base.removeprefix("wss://")
    elif not base.startswith(("http://", "https://")):
        raise StreamError(
            "invalid_url", f"the server URL must start with http(s):// or ws(s)://, got {url!r}"
        )
    return base


def _error_from_body(body: Any, status: int | None, fallback: str) -> StreamError:
    if isinstance(body, dict):
        reason = body.get("error") or body.get("reason") or "error"
        message = body.get("message") or body.get("detail") or fallback
        return StreamError(
            str(reason),
            str(message),
            status=body.get("status", status),
            call_id=body.get("call_id"),
            seq=body.get("seq"),
            body=body,
        )
    return StreamError("error", fallback, status=status)


class _Replay:
    """The state of one replay, shared by both transports."""

    def __init__(
        self,
        script: CallScript,
        call_id: str,
        transport: Transport,
        speed: float,
        resend: Collection[int],
        timeout: float,
        emit: Callable[[ReplayEvent], None],
    ) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0 (0: as fast as possible), got {speed}")
        self.script, self.speed, self.timeout, self.emit = script, speed, timeout, emit
        self.resend = frozenset(resend)
        self.result = ReplayResult(call_id, transport)
        self.timings: dict[int, ChunkTiming] = {}
        self.seen: set[str] = set()
        self.close_sent_at: float | None = None
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def wait_until_due(self, chunk: PlannedChunk) -> None:
        if self.speed > 0:
            delay = chunk.at / self.speed - self.now()
            if delay > 0:
                await asyncio.sleep(delay)

    def open_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "call_id": self.result.call_id,
            "modality": self.script.modality,
            "metadata": {"source": self.script.source_id[:1024]},
        }
        if self.script.language:
            message["language"] = self.script.language
        return message

    def chunk_message(self, seq: int) -> dict[str, Any]:
        return {"call_id": self.result.call_id, "seq": seq, **self.script.chunks[seq].fields}

    def sent(self, seq: int) -> None:
        timing = self.timings.get(seq)
        if timing is None:
            timing = self.timings[seq] = ChunkTiming(seq, self.now())
            self.result.chunks.append(timing)
        else:
            timing.resent = True

    def opened(self, body: dict[str, Any]) -> None:
        self.emit(ReplayEvent("opened", body, self.now()))

    def acked(self, seq: int, duplicate: bool, body: dict[str, Any]) -> None:
        timing = self.timings.get(seq)
        if timing is None:
            raise StreamError("protocol_error", f"the server acknowledged chunk {seq}, which was never sent")
        if duplicate:
            timing.duplicate_acked = True
        elif timing.acked_at is None:
            timing.acked_at = self.now()
        self.emit(ReplayEvent("ack", body, self.now(), timing.round_trip_s if not duplicate else None))

    def decision(self, decision: dict[str, Any], *, on_close: bool | None = None) -> None:
        key = _decision_key(decision)
        if key in self.seen:  # repeated for a resent chunk
            self.result.repeated_decisions += 1
            return
        self.seen.add(key)
        at = self.now()
        if on_close is None:  # WebSocket: what arrives after the close was sent is the close's answer
            on_close = self.close_sent_at is not None and decision.get("seq") == len(self.script.chunks) - 1
        timing = self.timings.get(int(decision.get("seq", -1)))
        sent = self.close_sent_at if on_close or timing is None else timing.sent_at
        latency = at - (sent if sent is not None else 0.0)
        self.result.decisions.append(ReceivedDecision(decision, at, latency, on_close))
        self.emit(ReplayEvent("decision", decision, at, latency))

    def verdict(self, verdict: dict[str, Any]) -> None:
        at = self.now()
        self.result.verdict = verdict
        if self.close_sent_at is not None:
            self.result.close_round_trip_s = at - self.close_sent_at
        self.result.wall_s = at
        self.emit(ReplayEvent("verdict", verdict, at, self.result.close_round_trip_s))


async def _replay_ws(replay: _Replay, url: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    call_id = replay.result.call_id
    chunks = replay.script.chunks
    expected_acks = len(chunks) + len(replay.resend)
    state: dict[str, Any] = {"acks": 0, "failure": None}
    opened, acks_done, verdict_seen, failed = (asyncio.Event() for _ in range(4))
    acked: dict[int, asyncio.Event] = {seq: asyncio.Event() for seq in replay.resend}

    def fail(err: StreamError) -> None:
        if state["failure"] is None:
            state["failure"] = err
        failed.set()

    async def wait(event: asyncio.Event, what: str) -> None:
        waiter = asyncio.ensure_future(event.wait())
        failure = asyncio.ensure_future(failed.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, failure}, timeout=replay.timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
            failure.cancel()
        if state["failure"] is not None:
            raise state["failure"]
        if not done:
            raise StreamError("timeout", f"no {what} from the server within {replay.timeout:g} s")

    async def receive(ws: Any) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                kind = message.pop("type", None)
                if message.get("call_id") not in (None, call_id):
                    continue
                if kind == "error":
                    fail(_error_from_body(message, message.get("status"), "the server refused a message"))
                elif kind == "opened":
                    replay.opened(message)
                    opened.set()
                elif kind == "ack":
                    seq = int(message["seq"])
                    replay.acked(seq, bool(message.get("duplicate")), message)
                    if seq in acked:
                        acked[seq].set()
                    state["acks"] += 1
                    if state["acks"] >= expected_acks:
                        acks_done.set()
                elif kind == "decision":
                    replay.decision(message)
                elif kind == "verdict":
                    replay.verdict(message)
                    verdict_seen.set()
        except ConnectionClosed as err:
            fail(StreamError("connection_error", f"the server closed the stream: {err}"))
        except StreamError as err:
            fail(err)
        except (ValueError, KeyError, TypeError) as err:
            fail(StreamError("protocol_error", f"unexpected message from the server: {err}"))
        else:
            fail(StreamError("connection_error", "the server closed the stream"))

    try:
        ws = await connect(_ws_url(url), max_size=None, open_timeout=replay.timeout)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as err:
        raise StreamError("connection_error", f"cannot connect to {_ws_url(url)}: {err}") from None
    receiver = asyncio.ensure_future(receive(ws))
    try:

        async def send(message: dict[str, Any]) -> None:
            try:
                await ws.send(json.dumps(message, ensure_ascii=False))
            except ConnectionClosed as err:
                raise StreamError("connection_error", f"the server closed the stream: {err}") from None

        await send({"type": "open", **replay.open_message()})
        await wait(opened, "answer to the open")
        replay.start = time.perf_counter()  # call time starts once the call is open
        for seq, chunk in enumerate(chunks):
            await replay.wait_until_due(chunk)
            if failed.is_set():
                break
            replay.sent(seq)
            await send({"type": "chunk", **replay.chunk_message(seq)})
            if seq in replay.resend:
                await wait(acked[seq], f"ack of chunk {seq}")
                replay.sent(seq)
                await send({"type": "chunk", **replay.chunk_message(seq)})
        if expected_acks:
            await wait(acks_done, "acks of every chunk")
        # A chunk's decisions follow its ack on the socket. A ping's pong comes back behind whatever the server
        # sent before it, so once it is in (and the receiver had a moment to read what came with it) every
        # chunk's decisions have arrived, and what arrives after the close is the close's answer.
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(await ws.ping(), replay.timeout)
        await asyncio.sleep(0.005)
        replay.close_sent_at = replay.now()
        await send({"type": "close", "call_id": call_id, "last_seq": len(chunks) - 1})
        await wait(verdict_seen, "verdict")
    finally:
        receiver.cancel()
        await ws.close()


async def _replay_http(replay: _Replay, url: str) -> None:
    import httpx

    call_id = replay.result.call_id

    async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any], expect: int = 200) -> Any:
        try:
            response = await http.post(path, json=body)
        except httpx.HTTPError as err:
            raise StreamError(
                "connection_error", f"{_http_url(url)}{path}: {type(err).__name__}: {err}"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code != expect:
            raise _error_from_body(
                data, response.status_code, f"HTTP {response.status_code}: {response.text[:300]}"
            )
        return data

    async with httpx.AsyncClient(base_url=_http_url(url), timeout=replay.timeout) as http:
        opened = await post(http, "/v1/calls", replay.open_message(), expect=201)
        replay.opened(opened)
        replay.start = time.perf_counter()
        for seq, chunk in enumerate(replay.script.chunks):
            await replay.wait_until_due(chunk)
            for _ in range(2 if seq in replay.resend else 1):
                replay.sent(seq)
                body = replay.chunk_message(seq)
                body.pop("call_id")
                answer = await post(http, f"/v1/calls/{call_id}/chunks", body)
                replay.acked(
                    seq, bool(answer.get("duplicate")), {k: v for k, v in answer.items() if k != "decisions"}
                )
                for decision in answer.get("decisions", []):
                    replay.decision(decision, on_close=False)
        replay.close_sent_at = replay.now()
        closed = await post(http, f"/v1/calls/{call_id}/close", {"last_seq": len(replay.script.chunks) - 1})
        for decision in closed.get("decisions", []):
            replay.decision(decision, on_close=True)
        replay.verdict(closed["verdict"])


def new_call_id(script: CallScript) -> str:
    """A server-side call id: the source's last path part (letters, digits, ._-) and a random suffix."""
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in script.source_id.rpartition("/")[2])
    return f"{stem[:80] or 'call'}-{uuid.uuid4().hex[:8]}"


async def replay_call(
    url: str,
    script: CallScript,
    *,
    speed: float = 1.0,
    transport: Transport = "ws",
    call_id: str | None = None,
    resend: Collection[int] = (),
    timeout: float = 60.0,
    on_event: Callable[[ReplayEvent], None] | None = None,
) -> ReplayResult:
    """Stream `script` to the detector at `url` (http://host:port) and return decisions, verdict and timings.

    `speed`: 1 real time, X times faster, 0 as fast as possible. `call_id`: the id the call is opened with
    (default: generated from the source). `resend`: chunk numbers sent twice (a deliberate retry). `timeout`:
    seconds to wait for any one answer. `on_event` sees every event as it arrives. Raises StreamError.
    """
    replay = _Replay(
        script,
        call_id or new_call_id(script),
        transport,
        speed,
        resend,
        timeout,
        on_event or (lambda _event: None),
    )
    if transport == "ws":
        await _replay_ws(replay, url)
    elif transport == "http":
        await _replay_http(replay, url)
    else:
        raise ValueError(f"transport is 'ws' or 'http', not {transport!r}")
    return replay.result


async def iter_replay(url: str, script: CallScript, **options: Any) -> AsyncIterator[ReplayEvent]:
    """`replay_call`'s events as they arrive (the verdict last); raises StreamError like replay_call."""
    queue: asyncio.Queue[ReplayEvent | BaseException | None] = asyncio.Queue()

    async def run() -> None:
        try:
            await replay_call(url, script, on_event=queue.put_nowait, **options)
        except BaseException as err:  # handed to the consumer
            queue.put_nowait(err)
        else:
            queue.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation) or None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))
