"""Where live calls are kept: the session store behind the detector.

`SessionStore` is the one interface the detector uses for a call's state: open it, take a chunk (the sequence
check and the append are one atomic step), read it, hold it for an evaluation (a lease) and write back what the
evaluation changed, close or expire it. Two backends:

- `MemoryStore` (the default, `detector.session_store: memory`): the calls live in this process
  (`teleguard.serve.session.CallRegistry`); a call is lost with its replica, so it is enough for one replica.
- `teleguard.serve.redis_store.RedisStore` (`redis://host:port/db`): every call lives in Redis, so any replica
  serves any chunk and a replica that dies or drains loses nothing.

A lease is the right to evaluate (or close, or expire) one call: one holder at a time across replicas, so a
call's evaluations never run twice and their results are written at once. In Redis a lease lapses after
`StoreConfig.lease_seconds` unless its holder renews it, so a killed replica's hold on a call ends by itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from teleguard.serve.chunks import ChunkLimits
from teleguard.serve.protocol import Chunk, OpenCall, Verdict
from teleguard.serve.session import CallRegistry, CallSession, Clock, SessionLimits

MEMORY = "memory"
STORE_SCHEMES = ("redis://", "rediss://", "unix://")


class StoreConfig(BaseModel):
    """How the detector talks to a shared session store (the in-memory store ignores it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(default=1.0, gt=0)  # one store operation; beyond it the request gets 503
    # An evaluation's hold on its call, renewed while it runs: a killed replica's hold ends after this long
    # and another replica takes the call over.
    lease_seconds: float = Field(default=5.0, gt=0)
    key_prefix: str = Field(default="teleguard", pattern=r"^[\w.:-]{1,64}$")  # keys: PREFIX:call:ID...
    # Which replica this is, in the store's ownership sets (default: host name, process id and a random part).
    replica_id: str | None = Field(default=None, pattern=r"^[\w.:-]{1,128}$")


class StoreUnavailable(Exception):
    """The session store could not be reached or did not answer in time; nothing was changed by this side."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # "timeout" or "error", the metrics' label


@dataclass(frozen=True)
class Lease:
    """The right to evaluate, close or expire one call until released (or, in a shared store, lapsed); `seq`
    is the chunk it evaluates (None: a close or an expiry), so that a request for that chunk waits for it."""

    call_id: str
    seq: int | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def value(self) -> str:
        return f"{self.token}:{'' if self.seq is None else self.seq}"


def lease_seq(value: str | None) -> int | None:
    """The chunk a stored lease value evaluates."""
    tail = (value or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class Receipt:
    """A chunk taken: `new` (False for a retry of an accepted one) and the call as it now is."""

    new: bool
    session: CallSession


def redact(url: str) -> str:
    """A store URL fit for a log line: the password left out."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def valid_store_url(value: str) -> str:
    if value != MEMORY and not value.startswith(STORE_SCHEMES):
        raise ValueError(
            f"session_store is 'memory' or a Redis URL ({', '.join(s + '...' for s in STORE_SCHEMES)}), "
            f"got {redact(value)!r}"
        )
    return value


class SessionStore(ABC):
    """Live calls, kept so that the detector's steps on a call are atomic (see the module's text)."""

    # whether calls outlive this process (several replicas may share them)
    shared: bool = False

    def __init__(
        self, *, max_calls: int, ttl_seconds: float, limits: SessionLimits, chunk_limits: ChunkLimits
    ):
        self.max_calls, self.ttl_seconds = max_calls, ttl_seconds
        self.limits, self.chunk_limits = limits, chunk_limits
        self.carried = (
            0  # open calls this replica carries (a shared store: those whose last request it served)
        )

    async def start(self) -> None:
        """Connect (on the serving event loop)."""
        return None  # nothing to do in memory

    async def aclose(self) -> None:
        """Let go of connections."""
        return None  # nothing to do in memory

    async def check(self) -> None:
        """Raise StoreUnavailable unless the store answers now (readiness)."""
        return None  # nothing to do in memory

    @abstractmethod
    async def open(self, request: OpenCall) -> None:
        """A new call (`call_exists`, `too_many_calls`)."""

    @abstractmethod
    async def receive(self, chunk: Chunk) -> Receipt:
        """Check the chunk's sequence number and, when it is the next one, decode and append it; one atomic
        step. RequestError as a session's `receive` raises them."""

    @abstractmethod
    async def get(
        self, call_id: str, *, open_only: bool = True, audio: bool = False, lease: Lease | None = None
    ) -> CallSession:
        """The call (`unknown_call`; `closed_call` when closed and `open_only`). Without `audio`, a shared
        store's copy knows how much audio is held but not the samples (enough for the policy's `due`). Its
        `evaluating` says whether an evaluation other than `lease`'s holds the call."""

    @abstractmethod
    async def lease(self, call_id: str, seq: int | None = None) -> Lease | None:
        """Hold the call (to evaluate chunk `seq`), or None when another evaluation holds it."""

    @abstractmethod
    async def holder(self, call_id: str) -> int | None:
        """The chunk the evaluation holding the call evaluates (None: none, or a close)."""

    async def wait_lease(self, call_id: str, timeout: float, seq: int | None = None) -> Lease | None:
        """Hold the call once the evaluation holding it is done (or its lease lapsed), up to `timeout` s."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            lease = await self.lease(call_id, seq)
            if lease is not None or time.monotonic() >= deadline:
                return lease
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    @abstractmethod
    async def renew(self, lease: Lease) -> bool:
        """Extend a lease while its evaluation runs; False when it was lost."""

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """Let go of a lease without writing anything."""

    @abstractmethod
    async def commit(
        self,
        lease: Lease,
        session: CallSession,
        *,
        decisions_before: int,
        verdict: Verdict | None = None,
        expire: bool = False,
    ) -> bool:
        """Write what an evaluation changed (policy state, the decisions after `decisions_before`) and release
        the lease, all at once. With `verdict` the call is closed; with `expire` too it is forgotten, but only
        while it is still idle for the TTL. False (nothing written) when the lease was lost or, expiring, the
        call was used meanwhile."""

    @abstractmethod
    async def idle(self) -> list[str]:
        """Open calls idle for the TTL: the ones to expire."""

    @abstractmethod
    async def open_calls(self) -> int:
        """Open calls in the store (all replicas')."""

    async def refresh(self) -> int:
        """Bring `carried` up to date (another replica may have taken calls over) and return it."""
        return self.carried

    async def hand_over(self) -> None:
        """Draining: this replica carries its calls no more (another takes each at its next request)."""
        return None  # nothing to do in memory


class MemoryStore(SessionStore):
    """The calls in this process's memory: today's detector, and one replica's only."""

    shared = False

    def __init__(
        self,
        *,
        max_calls: int,
        ttl_seconds: float,
        limits: SessionLimits,
        chunk_limits: ChunkLimits,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            max_calls=max_calls, ttl_seconds=ttl_seconds, limits=limits, chunk_limits=chunk_limits
        )
        self.registry = CallRegistry(
            max_calls=max_calls,
            ttl_seconds=ttl_seconds,
            limits=limits,
            chunk_limits=chunk_limits,
            clock=clock,
        )
        self._leases: dict[str, Lease] = {}

    async def open(self, request: OpenCall) -> None:
        self.registry.open(request)
        self.carried = len(self.registry)

    async def receive(self, chunk: Chunk) -> Receipt:
        session = self.registry.get(chunk.call_id)
        return Receipt(session.receive(chunk), session)

    async def get(
        self, call_id: str, *, open_only: bool = True, audio: bool = False, lease: Lease | None = None
    ) -> CallSession:
        return self.registry.get(call_id, open_only=open_only)

    async def lease(self, call_id: str, seq: int | None = None) -> Lease | None:
        if call_id in self._leases:
            return None
        self._leases[call_id] = lease = Lease(call_id, seq)
        return lease

    async def holder(self, call_id: str) -> int | None:
        held = self._leases.get(call_id)
        return None if held is None else held.seq

    async def renew(self, lease: Lease) -> bool:
        return self._leases.get(lease.call_id) is lease

    async def release(self, lease: Lease) -> None:
        if self._leases.get(lease.call_id) is lease:
            del self._leases[lease.call_id]

    async def commit(
        self,
        lease: Lease,
        session: CallSession,
        *,
        decisions_before: int,
        verdict: Verdict | None = None,
        expire: bool = False,
    ) -> bool:
        # the policy wrote into the live session itself: only closing is left to do
        if self._leases.get(lease.call_id) is not lease:
            return False
        try:
            if expire and (session.closed or session.idle_seconds() < self.ttl_seconds):
                return False
            if verdict is not None and not session.closed:
                session.close()
            if verdict is not None:
                session.verdict = verdict
            if expire:
                self.registry.forget(session.call_id)
            self.carried = len(self.registry)
            return True
        finally:
            await self.release(lease)

    async def idle(self) -> list[str]:
        return self.registry.idle()

    async def open_calls(self) -> int:
        return len(self.registry)

    async def refresh(self) -> int:
        self.carried = len(self.registry)
        return self.carried
