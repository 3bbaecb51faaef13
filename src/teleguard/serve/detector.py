"""The real-time detector: live calls, the decision policy, an engine and the Prometheus metrics, together.

`Detector` is what a server calls: `open`, `chunk`, `close` (and `resume`) for streamed calls and `classify`
for a whole call at once. Its calls live in a session store (`teleguard.serve.store`: this process's memory by
default, or Redis shared by replicas; at most `max_calls` open calls per replica, each bounded by
`SessionLimits`). It expires idle calls after `ttl_seconds` (a sweeper task gives them their verdict), bounds
every engine invocation by `engine_timeout_s`, and drains on shutdown: new requests are refused while
evaluations in flight finish, up to a deadline, and then a shared store's calls are handed over.

An evaluation holds its call's lease (`SessionStore.lease`) from reading the call to writing its decisions, so
across replicas a call is evaluated by one at a time and each content point once; the lease is renewed while
the engine works. A retried chunk that finds an evaluation of its call in flight waits for it (or for its
lease to lapse, when its replica died) and answers with the decisions made on it.

Errors are exceptions with an HTTP status and a JSON body (`to_dict()`):

- `RequestError` (4xx; protocol.REASON_STATUS): the request is wrong or does not fit the call's state. Nothing
  changed. Each is counted by `DetectorMetrics.rejected`.
- `Unavailable` (503): the engine failed (`engine_error`) or timed out (`engine_timeout`), the session store is
  unreachable (`store_unavailable`), another evaluation of the call outlasted the wait (`call_busy`), or the
  detector is shutting down (`shutting_down`). After an engine failure the chunk stays accepted and the call
  keeps its state: the content counts as not evaluated, so resending the same chunk (a retry, not counted
  twice) evaluates it, as does the next chunk or the close. After a store failure nothing is kept anywhere
  else: the request is retried as is (a chunk the store did take is then a retry).

Metrics follow `teleguard.serve.metrics`: `model_call` per engine invocation (failed ones too) and
`engine_error` per failure; `observe_decision` per evaluation; `observe_chunk` per accepted chunk;
`call_opened` / `call_closed` once per call (expired calls with expired=True), by the replica that opens it and
the one that closes it; `alert` at a call's first alert; `store_error` per failed store operation. With a shared
store the active-calls gauge is the calls this replica carries (`carried_calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    ResumeCall,
    Verdict,
    parse_message,
)
from teleguard.serve.session import CallRegistry, CallSession, Clock, SessionLimits
from teleguard.serve.store import (
    MEMORY,
    Lease,
    MemoryStore,
    SessionStore,
    StoreConfig,
    StoreUnavailable,
    valid_store_url,
)

log = logging.getLogger(__name__)

_IN_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("teleguard_in_request", default=False)


class Unavailable(RequestError):
    """503: the engine or the session store failed or timed out, the call is busy, or the detector is shutting
    down. The call's state is kept."""

    def __init__(
        self,
        reason: Literal[
            "engine_error", "engine_timeout", "store_unavailable", "call_busy", "shutting_down", "not_ready"
        ],
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
    # Where calls live: "memory" (this process; enough for one replica) or a Redis URL
    # (redis://host:port/db, rediss://, unix://) that every replica shares (teleguard.serve.store).
    session_store: str = MEMORY
    store: StoreConfig = Field(default_factory=StoreConfig)
    # A whole call sent at once (V2 infer) may hold as much audio as a session keeps; PCM16 stereo bytes.
    classify_max_audio_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    @field_validator("session_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return valid_store_url(value)

    @property
    def sweep_interval(self) -> float:
        return self.sweep_seconds or min(self.ttl_seconds / 4, 10.0)

    @property
    def busy_seconds(self) -> float:
        """How long a request waits for an evaluation of its call in flight (three rounds, each timed out)."""
        return self.engine_timeout_s * 4 + self.store.lease_seconds + 1


def build_store(
    url: str,
    config: StoreConfig,
    *,
    max_calls: int,
    ttl_seconds: float,
    limits: SessionLimits,
    chunk_limits: ChunkLimits,
    clock: Clock = time.monotonic,
) -> SessionStore:
    """The store a `detector.session_store` value names: "memory", or a Redis URL."""
    if url == MEMORY:
        return MemoryStore(
            max_calls=max_calls,
            ttl_seconds=ttl_seconds,
            limits=limits,
            chunk_limits=chunk_limits,
            clock=clock,
        )
    valid_store_url(url)
    from teleguard.serve.redis_store import RedisStore  # redis-py only where a Redis store is asked for

    return RedisStore(
        url, config, max_calls=max_calls, ttl_seconds=ttl_seconds, limits=limits, chunk_limits=chunk_limits
    )


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
class ResumeResult:
    """Where a call stands, for a client that reconnects: the last chunk the detector took (-1: none yet)."""

    call_id: str
    last_seq: int
    closed: bool
    decisions: int
    verdict: Verdict | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "call_id": self.call_id,
            "last_seq": self.last_seq,
            "closed": self.closed,
            "decisions": self.decisions,
        }
        if self.verdict is not None:
            body["verdict"] = self.verdict.model_dump(mode="json")
        return body


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
        store: SessionStore | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy or DecisionPolicy()
        self.config = config or DetectorConfig()
        self.metrics = metrics or default_metrics()
        # an engine that counts (a cascade) counts where the detector does
        if (bind_metrics := getattr(engine, "bind_metrics", None)) is not None:
            bind_metrics(self.metrics)
        self.store = store or build_store(
            self.config.session_store,
            self.config.store,
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
        self._checked_at = -1.0  # when the store last answered a readiness check

    @property
    def registry(self) -> CallRegistry:
        """The calls of an in-memory store (in-process callers read live sessions from it)."""
        if not isinstance(self.store, MemoryStore):
            raise AttributeError("the calls live in a shared store, not in this process")
        return self.store.registry

    # --- lifetime ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach the store and start the sweeper that expires idle calls (on the serving event loop). A store
        that does not answer yet leaves the detector unready, not failed: readiness asks again."""
        try:
            await self.store.start()
        except StoreUnavailable as err:
            self._store_failed(err)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="teleguard-ttl-sweeper"
            )

    async def _sweep(self) -> None:
        # a shared store's calls move between replicas: this replica's share is counted again often
        interval = self.config.sweep_interval
        if self.store.shared:
            interval = min(interval, 2.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire()
                await self.count_carried()
            except StoreUnavailable as err:
                self._store_failed(err)
            except Exception:  # the sweeper must outlive a bug in one call's verdict
                log.exception("expiring idle calls failed")

    async def ready(self) -> bool:
        """Whether requests can be served now: with a shared store, whether it answers."""
        if self._draining:
            return False
        if not self.store.shared:
            return True
        # KServe asks on every V1/V2 request too: a recent answer stands for a moment
        if time.monotonic() - self._checked_at < 0.5:
            return True
        try:
            await self.store.check()
        except StoreUnavailable as err:
            self._store_failed(err)
            return False
        self._checked_at = time.monotonic()
        return True

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
        """Stop accepting requests and wait for those in flight, up to `timeout` s; then a shared store's calls
        are handed over (their state is all in the store already). Returns how many requests remain."""
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
        if self.store.shared:
            try:
                await self.store.hand_over()
                self.metrics.carried_calls(0)
            except StoreUnavailable as err:
                self._store_failed(err)
        return self._inflight

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain, stop the sweeper, release the engine and the store."""
        await self.drain(timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        await close_engine(self.engine)
        with contextlib.suppress(Exception):
            await self.store.aclose()

    def refuse(self, err: RequestError) -> RequestError:
        """Count a refused request (4xx) and return the error to raise."""
        if 400 <= err.status < 500:
            self.metrics.rejected(err.reason)
        return err

    def _store_failed(
        self,
        err: StoreUnavailable,
        call_id: str | None = None,
        seq: int | None = None,
        accepted: bool = False,
    ) -> Unavailable:
        """Count a store failure and say it as a 503 (`accepted`: the chunk was taken before it failed)."""
        self.metrics.store_error(err.kind)
        log.warning("session store: %s", err)
        return Unavailable(
            "store_unavailable",
            f"{err}; nothing was kept elsewhere: retry the request as it is",
            call_id=call_id,
            seq=seq,
            accepted=accepted,
        )

    async def count_carried(self) -> int:
        """Count again the calls this replica carries (others may have taken some over) into the gauge."""
        carried = await self.store.refresh()
        self._track()
        return carried

    def _track(self) -> None:
        """With a shared store, the active-calls gauge is the calls this replica carries."""
        if self.store.shared:
            self.metrics.carried_calls(self.store.carried)

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
        """Evaluate a session no store holds (a V2 classification)."""
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
        self.metrics.call_closed(
            verdict_kind(session, verdict),
            verdict.first_alert_time,
            expired=expired,
            active=not self.store.shared,
        )
        self._track()

    # --- holding a call ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _holding(self, lease: Lease) -> AsyncIterator[None]:
        """Renew a shared store's lease while the block runs (the engine may take longer than a lease). The block
        releases the lease itself (or commits, which releases it); one left behind by an unforeseen error is let
        go here in memory, where it would never lapse, and lapses by itself in a shared store."""
        renewer: asyncio.Task[None] | None = None
        if self.store.shared:
            renewer = asyncio.get_running_loop().create_task(self._renew(lease))
        try:
            yield
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await renewer
            else:
                await self.store.release(lease)  # a no-op once released

    async def _renew(self, lease: Lease) -> None:
        pause = self.config.store.lease_seconds / 3
        while True:
            await asyncio.sleep(pause)
            try:
                if not await self.store.renew(lease):
                    log.warning("call %s: the evaluation's lease was lost", lease.call_id)
                    return
            except StoreUnavailable as err:
                self._store_failed(err)

    async def _release(self, lease: Lease) -> None:
        """Let go of a lease; a store that does not answer lets it lapse by itself."""
        try:
            await self.store.release(lease)
        except StoreUnavailable as err:
            self._store_failed(err)

    async def _commit(
        self,
        lease: Lease,
        session: CallSession,
        before: int,
        *,
        seq: int | None,
        verdict: Verdict | None = None,
    ) -> None:
        """Store what an evaluation changed; 503 store_unavailable when it could not be (nothing is answered
        that the store does not hold)."""
        try:
            stored = await self.store.commit(lease, session, decisions_before=before, verdict=verdict)
        except StoreUnavailable as err:
            raise self._store_failed(err, session.call_id, seq, seq is not None) from None
        if not stored:
            err = StoreUnavailable(
                f"call {session.call_id}: the evaluation's hold on the call lapsed before it was stored"
            )
            raise self._store_failed(err, session.call_id, seq, seq is not None)

    async def _keep_after_failure(self, lease: Lease, session: CallSession, before: int) -> None:
        """After an engine failure: store the model calls spent and any decisions made (the policy kept them)."""
        try:
            await self.store.commit(lease, session, decisions_before=before)
        except StoreUnavailable as err:
            self._store_failed(err)

    # --- streamed calls ----------------------------------------------------------------------------------

    async def open(self, data: OpenCall | dict[str, Any] | str | bytes) -> OpenCall:
        """Open a call (`call_exists` 409, `too_many_calls` 429). Returns the request with its call id."""
        with self.request():
            try:
                request = data if isinstance(data, OpenCall) else parse_message(OpenCall, data)
                await self.store.open(request)
            except RequestError as err:
                raise self.refuse(err) from None
            except StoreUnavailable as err:
                raise self._store_failed(err) from None
            self.metrics.call_opened(active=not self.store.shared)
            self._track()
            return request

    async def chunk(self, data: Chunk | dict[str, Any] | str | bytes) -> ChunkResult:
        """Take one chunk; evaluate the call when the policy says so. RequestError (4xx) or Unavailable (503)."""
        with self.request():
            start = time.perf_counter()
            try:
                chunk = data if isinstance(data, Chunk) else parse_chunk(data)
            except RequestError as err:
                raise self.refuse(err) from None
            try:
                receipt = await self.store.receive(chunk)
            except RequestError as err:
                raise self.refuse(err) from None
            except StoreUnavailable as err:
                raise self._store_failed(err, chunk.call_id, chunk.seq) from None
            self._track()
            decisions = await self._decide(receipt.session, chunk.seq, new=receipt.new)
            if receipt.new:
                self.metrics.observe_chunk(time.perf_counter() - start)
            return ChunkResult(chunk.call_id, chunk.seq, not receipt.new, decisions)

    async def _decide(self, view: CallSession, seq: int, *, new: bool) -> list[Decision]:
        """The decisions a chunk gets: a new one is evaluated when the policy says so and the call is free; a
        retry of the latest chunk evaluates what an engine failure left unevaluated; an older retry repeats the
        decisions made on it. A request that finds its own chunk being evaluated (a retry, or the same chunk
        racing on two replicas) waits for that evaluation and answers with its decisions."""
        latest = seq == view.next_seq - 1
        waited = not new and view.evaluating
        if not waited and not ((new or latest) and self.policy.due(view) is not None):
            return [] if new else view.decisions_for(seq)
        try:
            lease = None if waited else await self.store.lease(view.call_id, seq)
            if lease is None and (not new or await self.store.holder(view.call_id) == seq):
                lease, waited = await self.store.wait_lease(view.call_id, self.config.busy_seconds, seq), True
        except StoreUnavailable as err:
            raise self._store_failed(err, view.call_id, seq, True) from None
        if lease is None:  # another evaluation has the call: what is new is evaluated at the next point
            return view.decisions_for(seq) if waited else []
        async with self._holding(lease):
            try:
                session = await self.store.get(view.call_id, audio=True, lease=lease)
            except (RequestError, StoreUnavailable) as err:
                await self._release(lease)
                if isinstance(err, StoreUnavailable):
                    raise self._store_failed(err, view.call_id, seq, True) from None
                return []  # closed meanwhile: the close evaluated what was there
            if not (new or latest) or self.policy.due(session) is None:
                await self._release(lease)
                return session.decisions_for(seq) if waited or not new else []
            before, alerts_before = len(session.decisions), session.alerts
            start = time.perf_counter()
            try:
                decisions = await self.policy.evaluate(session, self._generate, seq=seq)
            except asyncio.CancelledError:
                await asyncio.shield(self._release(lease))
                raise
            except Exception as err:
                await self._keep_after_failure(lease, session, before)
                raise self._unavailable(err, session, seq, True) from None
            await self._commit(lease, session, before, seq=seq)
        self._record(session, decisions, time.perf_counter() - start, alerts_before)
        return decisions or session.decisions_for(seq)

    async def resume(self, data: ResumeCall | dict[str, Any] | str | bytes) -> ResumeResult:
        """Where a call stands (any replica can say, with a shared store): its last chunk taken, and the verdict
        once closed. A reconnecting client resends from `last_seq + 1`; resending `last_seq` itself is a retry
        answered with the decisions made on it."""
        with self.request():
            try:
                request = data if isinstance(data, ResumeCall) else parse_message(ResumeCall, data)
                session = await self.store.get(request.call_id, open_only=False)
            except RequestError as err:
                raise self.refuse(err) from None
            except StoreUnavailable as err:
                raise self._store_failed(err) from None
            verdict = (session.verdict or self.policy.verdict(session)) if session.closed else None
            return ResumeResult(
                session.call_id, session.next_seq - 1, session.closed, len(session.decisions), verdict
            )

    async def close(self, data: CloseCall | dict[str, Any] | str | bytes) -> CloseResult:
        """Close a call: a last evaluation of what is new, then the verdict. Closing twice repeats the verdict."""
        with self.request():
            try:
                request = data if isinstance(data, CloseCall) else parse_message(CloseCall, data)
                view = await self.store.get(request.call_id, open_only=False)
                if view.closed:
                    return CloseResult(view.verdict or self.policy.verdict(view))
                # an evaluation in flight (another request of this call, maybe on another replica) finishes
                # first: its decisions count
                lease = await self.store.wait_lease(request.call_id, self.config.busy_seconds)
            except RequestError as err:
                raise self.refuse(err) from None
            except StoreUnavailable as err:
                raise self._store_failed(err) from None
            if lease is None:
                raise Unavailable(
                    "call_busy",
                    f"an evaluation of call {request.call_id} is still running after "
                    f"{self.config.busy_seconds:g} s; retry the close",
                    call_id=request.call_id,
                )
            async with self._holding(lease):
                try:
                    session = await self.store.get(request.call_id, open_only=False, audio=True, lease=lease)
                except (RequestError, StoreUnavailable) as err:
                    await self._release(lease)
                    if isinstance(err, StoreUnavailable):
                        raise self._store_failed(err, request.call_id) from None
                    raise self.refuse(err) from None
                if session.closed:  # closed by another replica meanwhile
                    await self._release(lease)
                    return CloseResult(session.verdict or self.policy.verdict(session))
                timing = _Timing(self._generate)
                before, alerts_before = len(session.decisions), session.alerts
                try:
                    decisions, verdict = await self.policy.close(session, timing, last_seq=request.last_seq)
                except RequestError as err:
                    await self._release(lease)
                    raise self.refuse(err) from None
                except asyncio.CancelledError:
                    await asyncio.shield(self._release(lease))
                    raise
                except Exception as err:
                    await self._keep_after_failure(lease, session, before)
                    raise self._unavailable(err, session, None, False) from None
                await self._commit(lease, session, before, seq=None, verdict=verdict)
            if timing.started is not None:
                self._record(session, decisions, time.perf_counter() - timing.started, alerts_before)
            self._finish(session, verdict)
            return CloseResult(verdict, decisions)

    async def expire(self) -> list[Verdict]:
        """Close calls idle for the TTL (their verdict from the decisions so far) and forget old closed ones.
        With a shared store any replica's sweeper may expire any call; the store lets one of them do it."""
        verdicts = []
        for call_id in await self.store.idle():
            lease = await self.store.lease(call_id)
            if lease is None:  # being evaluated: not idle
                continue
            try:
                session = await self.store.get(call_id, open_only=False, lease=lease)
            except RequestError:
                await self._release(lease)
                continue
            if session.closed:
                await self._release(lease)
                continue
            verdict = self.policy.verdict(session)
            if not await self.store.commit(
                lease, session, decisions_before=len(session.decisions), verdict=verdict, expire=True
            ):
                continue
            session.verdict = verdict
            self._finish(session, verdict, expired=True)
            verdicts.append(verdict)
            log.info("call %s expired after %.0f s idle", call_id, self.config.ttl_seconds)
        return verdicts

    @property
    def open_calls(self) -> int:
        """Open calls this replica carries (with the in-memory store, every open call)."""
        return self.store.carried

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
            # no store holds it: counted opened and closed here, the gauge back where it was
            self.metrics.call_opened()
            self.metrics.call_closed(verdict_kind(session, verdict), verdict.first_alert_time)
            return CloseResult(verdict, decisions)
