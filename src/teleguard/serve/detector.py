"""The real-time detector: live calls, the decision policy, an engine and the Prometheus metrics, together.

`Detector` is what a server calls: `open`, `chunk`, `close` for streamed calls and `classify` for a whole call
at once. It owns the `CallRegistry` (at most `max_calls` open calls, each bounded in memory by `SessionLimits`),
expires idle calls after `ttl_seconds` (a sweeper task gives them their verdict), bounds every engine
invocation by `engine_timeout_s`, and drains on shutdown: new requests are refused while evaluations in flight
finish, up to a deadline.

Errors are exceptions with an HTTP status and a JSON body (`to_dict()`):

- `RequestError` (4xx; protocol.REASON_STATUS): the request is wrong or does not fit the call's state. Nothing
  changed. Each is counted by `DetectorMetrics.rejected`.
- `Unavailable` (503): the engine failed (`engine_error`) or timed out (`engine_timeout`), or the detector is
  shutting down (`shutting_down`). After an engine failure the chunk stays accepted and the call keeps its
  state: the content counts as not evaluated, so resending the same chunk (a retry, not counted twice)
  evaluates it, as does the next chunk or the close.

Metrics follow `teleguard.serve.metrics`: `model_call` per engine invocation (failed ones too) and
`engine_error` per failure; `observe_decision` per evaluation; `observe_chunk` per accepted chunk;
`call_opened` / `call_closed` once per call (expired calls with expired=True); `alert` at a call's first alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from teleguard.contract import Round
from teleguard.engines.contract import (
    EngineError,
    EngineFailure,
    EngineRequest,
    EngineTimeout,
    Generate,
    Generation,
    as_generations,
    error_kind,
)
from teleguard.engines.wrappers import close_engine
from teleguard.serve.chunks import ChunkLimits, decode_chunk, parse_chunk
from teleguard.serve.metrics import DetectorMetrics, default_metrics
from teleguard.serve.metrics import Verdict as VerdictKind
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import (
    SAMPLE_RATE,
    Chunk,
    CloseCall,
    Decision,
    OpenCall,
    RequestError,
    Verdict,
    parse_message,
)
from teleguard.serve.session import CallRegistry, CallSession, SessionLimits

log = logging.getLogger(__name__)

_IN_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("teleguard_in_request", default=False)


class Unavailable(RequestError):
    """503: the engine failed or timed out, or the detector is shutting down. The call's state is kept."""

    def __init__(
        self,
        reason: Literal["engine_error", "engine_timeout", "shutting_down", "not_ready"],
        message: str,
        *,
        call_id: str | None = None,
        seq: int | None = None,
        accepted: bool = False,
    ) -> None:
        super().__init__(reason, message, status=503)
        self.call_id, self.seq, self.accepted = call_id, seq, accepted

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.call_id is not None:
            body.update(call_id=self.call_id, seq=self.seq, accepted=self.accepted)
        body["retryable"] = True
        return body


class DetectorConfig(BaseModel):
    """Limits and lifetimes of the detector (the policy and the engine have their own configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_calls: int = Field(default=1000, ge=1)  # open calls at once; more get 429 too_many_calls
    ttl_seconds: float = Field(default=300.0, gt=0)  # an idle call expires (and gets its verdict) after this
    sweep_seconds: float | None = Field(
        default=None, gt=0
    )  # how often to look for idle calls; ttl/4 by default
    engine_timeout_s: float = Field(default=30.0, gt=0)  # one engine invocation
    drain_seconds: float = Field(default=30.0, ge=0)  # how long shutdown waits for evaluations in flight
    session: SessionLimits = Field(default_factory=SessionLimits)
    chunk: ChunkLimits = Field(default_factory=ChunkLimits)
    # A whole call sent at once (V2 infer) may hold as much audio as a session keeps; PCM16 stereo bytes.
    classify_max_audio_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    @property
    def sweep_interval(self) -> float:
        return self.sweep_seconds or min(self.ttl_seconds / 4, 10.0)


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk led to: `duplicate` for a retry; decisions made on it (a retry repeats earlier ones)."""

    call_id: str
    seq: int
    duplicate: bool
    decisions: list[Decision] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "seq": self.seq,
            "duplicate": self.duplicate,
            "decisions": [d.model_dump(mode="json") for d in self.decisions],
        }


@dataclass(frozen=True)
class CloseResult:
    """The decisions of the last evaluation (if any) and the call's verdict."""

    verdict: Verdict
    decisions: list[Decision] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.verdict.call_id,
            "decisions": [d.model_dump(mode="json") for d in self.decisions],
            "verdict": self.verdict.model_dump(mode="json"),
        }


def verdict_kind(session: CallSession, verdict: Verdict) -> VerdictKind:
    """fraud (an alert was raised), normal (the model answered is_fraud), or undecided (it never did)."""
    if verdict.is_fraud:
        return VerdictKind.FRAUD
    if any(d.round is Round.FRAUD and d.is_fraud is not None for d in session.decisions):
        return VerdictKind.NORMAL
    return VerdictKind.UNDECIDED


class _Timing:
    """Wraps a generate to note when its first invocation started (the evaluation's model time)."""

    def __init__(self, generate: Generate) -> None:
        self.generate = generate
        self.started: float | None = None

    async def __call__(self, requests: Sequence[EngineRequest]) -> Sequence[str | Generation]:
        if self.started is None:
            self.started = time.perf_counter()
        return await self.generate(requests)


class Detector:
    """Live calls in, decisions and verdicts out. Async methods must run on one event loop."""

    def __init__(
        self,
        engine: Generate,
        *,
        policy: DecisionPolicy | None = None,
        config: DetectorConfig | None = None,
        metrics: DetectorMetrics | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.engine = engine
        self.policy = policy or DecisionPolicy()
        self.config = config or DetectorConfig()
        self.metrics = metrics or default_metrics()
        # an engine that counts (a cascade) counts where the detector does
        if (bind_metrics := getattr(engine, "bind_metrics", None)) is not None:
            bind_metrics(self.metrics)
        self.registry = CallRegistry(
            max_calls=self.config.max_calls,
            ttl_seconds=self.config.ttl_seconds,
            limits=self.config.session,
            chunk_limits=self.config.chunk,
            clock=clock,
        )
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._draining = False
        self._sweeper: asyncio.Task[None] | None = None

    # --- lifetime ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sweeper that expires idle calls (call on the serving event loop)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="teleguard-ttl-sweeper"
            )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                self.expire()
            except Exception:  # the sweeper must outlive a bug in one call's verdict
                log.exception("expiring idle calls failed")

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def inflight(self) -> int:
        return self._inflight

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight; refused with 503 shutting_down once draining (nested ones pass)."""
        if _IN_REQUEST.get():
            yield
            return
        if self._draining:
            raise Unavailable("shutting_down", "the detector is shutting down; reconnect to another replica")
        token = _IN_REQUEST.set(True)
        self._inflight += 1
        if self._idle is not None:
            self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            _IN_REQUEST.reset(token)
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self, timeout: float | None = None) -> int:
        """Stop accepting requests and wait for those in flight, up to `timeout` s. Returns how many remain."""
        self._draining = True
        timeout = self.config.drain_seconds if timeout is None else timeout
        if self._inflight:
            self._idle = asyncio.Event()
            if self._inflight == 0:
                self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._inflight:
            log.warning("shutdown: %d request(s) still in flight after %.1f s", self._inflight, timeout)
        return self._inflight

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain, stop the sweeper and release the engine."""
        await self.drain(timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        await close_engine(self.engine)

    def refuse(self, err: RequestError) -> RequestError:
        """Count a refused request (4xx) and return the error to raise."""
        if 400 <= err.status < 500:
            self.metrics.rejected(err.reason)
        return err

    # --- the engine, timed and counted ---------------------------------------------------------------------

    async def _generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        timeout = self.config.engine_timeout_s
        try:
            answers = list(await asyncio.wait_for(self.engine(requests), timeout))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if isinstance(err, TimeoutError) and not isinstance(err, EngineError):
                err = EngineTimeout(f"the engine did not answer within {timeout:g} s")
            elif not isinstance(err, EngineError):
                err = EngineFailure(f"the engine failed: {type(err).__name__}: {err}")
            self.metrics.model_call()
            self.metrics.engine_error(error_kind(err))
            raise err from None
        try:
            out = as_generations(answers, len(requests))
        except EngineError as err:
            self.metrics.model_call()
            self.metrics.engine_error("error")
            raise EngineFailure(str(err)) from None
        self.metrics.model_call(sum(a.tokens or 0 for a in out))
        return out

    def _unavailable(
        self, err: BaseException, session: CallSession, seq: int | None, accepted: bool
    ) -> Unavailable:
        kind = error_kind(err)
        what = "timed out" if kind == "timeout" else "failed"
        log.warning("engine %s on call %s: %s", what, session.call_id, err)
        return Unavailable(
            "engine_timeout" if kind == "timeout" else "engine_error",
            f"the engine {what} evaluating call {session.call_id} ({err}); the call keeps its state: "
            "resend the same chunk (or the next one, or close) to evaluate it",
            call_id=session.call_id,
            seq=seq,
            accepted=accepted,
        )

    def _record(
        self, session: CallSession, decisions: list[Decision], seconds: float, alerts_before: int
    ) -> None:
        if not decisions:
            return
        last = decisions[-1]
        fraud = next((d for d in decisions if d.round is Round.FRAUD), last)
        self.metrics.observe_decision(
            seconds, round=last.round, label=fraud.is_fraud, scene=last.scene, fraud_type=last.fraud_type
        )
        if alerts_before == 0 and session.alerts > 0:
            self.metrics.alert(session.fraud_type)

    async def _evaluate(self, session: CallSession, *, seq: int | None, accepted: bool) -> list[Decision]:
        alerts_before = session.alerts
        start = time.perf_counter()
        try:
            decisions = await self.policy.evaluate(session, self._generate, seq=seq)
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as err:
            raise self._unavailable(err, session, seq, accepted) from None
        self._record(session, decisions, time.perf_counter() - start, alerts_before)
        return decisions

    def _finish(self, session: CallSession, verdict: Verdict, *, expired: bool = False) -> None:
        self.metrics.call_closed(verdict_kind(session, verdict), verdict.first_alert_time, expired=expired)

    # --- streamed calls ----------------------------------------------------------------------------------

    async def open(self, data: OpenCall | dict[str, Any] | str | bytes) -> OpenCall:
        """Open a call (`call_exists` 409, `too_many_calls` 429). Returns the request with its call id."""
        with self.request():
            try:
                request = data if isinstance(data, OpenCall) else parse_message(OpenCall, data)
                self.registry.open(request)
            except RequestError as err:
                raise self.refuse(err) from None
            self.metrics.call_opened()
            return request

    async def chunk(self, data: Chunk | dict[str, Any] | str | bytes) -> ChunkResult:
        """Take one chunk; evaluate the call when the policy says so. RequestError (4xx) or Unavailable (503)."""
        with self.request():
            start = time.perf_counter()
            try:
                chunk = data if isinstance(data, Chunk) else parse_chunk(data)
                session = self.registry.get(chunk.call_id)
                new = session.receive(chunk)
            except RequestError as err:
                raise self.refuse(err) from None
            # A retry of the latest chunk evaluates what an engine failure left unevaluated; an older retry
            # only repeats the decisions already made on it.
            latest = chunk.seq == session.next_seq - 1
            if (new or latest) and self.policy.due(session) is not None:
                decisions = await self._evaluate(session, seq=chunk.seq, accepted=True)
                if not new and not decisions:
                    decisions = session.decisions_for(chunk.seq)
            else:
                decisions = [] if new else session.decisions_for(chunk.seq)
            if new:
                self.metrics.observe_chunk(time.perf_counter() - start)
            return ChunkResult(chunk.call_id, chunk.seq, not new, decisions)

    async def close(self, data: CloseCall | dict[str, Any] | str | bytes) -> CloseResult:
        """Close a call: a last evaluation of what is new, then the verdict. Closing twice repeats the verdict."""
        with self.request():
            try:
                request = data if isinstance(data, CloseCall) else parse_message(CloseCall, data)
                session = self.registry.get(request.call_id, open_only=False)
            except RequestError as err:
                raise self.refuse(err) from None
            # an evaluation in flight (another request of this call) finishes first: its decisions count
            deadline = time.monotonic() + self.config.engine_timeout_s * 4 + 1
            while session.evaluating and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            was_closed = session.closed
            timing = _Timing(self._generate)
            alerts_before = session.alerts
            try:
                decisions, verdict = await self.policy.close(session, timing, last_seq=request.last_seq)
            except RequestError as err:
                raise self.refuse(err) from None
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise self._unavailable(err, session, None, False) from None
            if timing.started is not None:
                self._record(session, decisions, time.perf_counter() - timing.started, alerts_before)
            if not was_closed:
                self._finish(session, verdict)
            return CloseResult(verdict, decisions)

    def expire(self, now: float | None = None) -> list[Verdict]:
        """Close calls idle for the TTL (their verdict from the decisions so far) and forget old closed ones."""
        verdicts = []
        for session in self.registry.expire(now):
            verdict = self.policy.verdict(session)
            session.verdict = verdict
            self._finish(session, verdict, expired=True)
            verdicts.append(verdict)
            log.info("call %s expired after %.0f s idle", session.call_id, self.config.ttl_seconds)
        return verdicts

    @property
    def open_calls(self) -> int:
        return len(self.registry)

    # --- a whole call at once ------------------------------------------------------------------------------

    async def classify(
        self,
        *,
        segments: Sequence[dict[str, Any]] = (),
        audio: str | None = None,
        wav: str | None = None,
        channels: int = 1,
        sample_rate: int = SAMPLE_RATE,
        language: Literal["zh", "en"] | None = None,
        modality: Literal["auto", "audio", "text"] = "auto",
        call_id: str | None = None,
    ) -> CloseResult:
        """Classify a whole call (transcript segments and/or audio, as a Chunk carries them) in one evaluation.

        The call is counted as opened and closed (its verdict counts in the fraud rate) once it is evaluated.
        """
        with self.request():
            try:
                request = OpenCall(
                    call_id=call_id or f"classify-{uuid.uuid4().hex}", language=language, modality=modality
                )
                chunk = parse_chunk(
                    {
                        "call_id": request.call_id,
                        "seq": 0,
                        "segments": list(segments),
                        "audio": audio,
                        "wav": wav,
                        "channels": channels,
                        "sample_rate": sample_rate,
                    }
                )
                limits = self.config.chunk.model_copy(
                    update={"max_audio_bytes": self.config.classify_max_audio_bytes}
                )
                decoded = decode_chunk(chunk, limits)
            except RequestError as err:
                raise self.refuse(err) from None
            session = CallSession.from_open(request, limits=self.config.session, chunk_limits=limits)
            session.add(decoded)
            session.next_seq = 1
            decisions = await self._evaluate(session, seq=0, accepted=False)
            session.close()
            verdict = self.policy.verdict(session)
            session.verdict = verdict
            self.metrics.call_opened()
            self._finish(session, verdict)
            return CloseResult(verdict, decisions)
