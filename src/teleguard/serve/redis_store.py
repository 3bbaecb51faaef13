"""The Redis session store: every live call in Redis, so that any replica serves any chunk of it.

Keys of one call (PREFIX is `StoreConfig.key_prefix`, ID the call id):

| key | type | holds |
|---|---|---|
| `PREFIX:call:ID` | hash | open settings, sequence position, content counters, `policy` (PolicyState JSON), `closed`, `verdict`, last activity (Redis time, ms), owner replica |
| `PREFIX:call:ID:audio`, `...:frames` | lists | the audio blocks kept (one per chunk, PCM16 when exact, else float32) and their frame counts |
| `PREFIX:call:ID:lines`, `...:lens` | lists | the transcript lines kept and their lengths in characters |
| `PREFIX:call:ID:digests` | hash | seq → content digest of the last `remember_chunks` chunks |
| `PREFIX:call:ID:decisions` | list | every decision, JSON |
| `PREFIX:call:ID:lease` | string | the evaluation holding the call (a random token), with a time to live |
| `PREFIX:open` | sorted set | open calls by last activity: the sweeper's index of idle calls |
| `PREFIX:owner:REPLICA` | set | the open calls a replica carries: its `teleguard_active_calls` |

Every step that changes a call is one Lua script, so it happens whole or not at all and two replicas never
interleave inside one: taking a chunk (sequence check, append, trim to the session's bounds, digest, activity,
ownership), writing an evaluation's results (only while its lease is held; the lease is released in the same
step), closing and expiring. Bounds are the in-memory session's: the blocks and lines are trimmed as
`CallSession` trims them, so a call read back holds exactly what one replica's memory would hold. Times come
from Redis's clock, so replicas need not agree on theirs. The scripts name keys of other replicas' ownership
sets, so the store is a single Redis (or a primary with replicas), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout
from redis.retry import Retry

from teleguard.serve.chunks import ChunkLimits, DecodedChunk, decode_chunk
from teleguard.serve.protocol import SAMPLE_RATE, Chunk, Decision, OpenCall, RequestError, Verdict
from teleguard.serve.session import (
    CallSession,
    PolicyState,
    SessionLimits,
    chunk_digest,
    closed_error,
    conflict_error,
    exists_error,
    full_error,
    gap_error,
    render_segment,
    unknown_error,
)
from teleguard.serve.store import (
    Lease,
    Receipt,
    SessionStore,
    StoreConfig,
    StoreUnavailable,
    lease_seq,
    redact,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS of every call script: 1 call hash, 2 audio, 3 frames, 4 lines, 5 lens, 6 digests, 7 decisions, 8 lease,
# 9 the open index, 10 this replica's ownership set. ARGV 1..3: call id, key prefix, replica id.
_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function take_over(owner)
  if owner ~= ARGV[3] then
    if owner then redis.call('SREM', ARGV[2] .. ':owner:' .. owner, ARGV[1]) end
    redis.call('HSET', KEYS[1], 'owner', ARGV[3])
  end
  redis.call('SADD', KEYS[10], ARGV[1])
end
"""

# ARGV 4 max calls this replica carries, 5 keys' time to live (ms), 6 language, 7 modality, 8 metadata, 9 policy
_OPEN = (
    _COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'call_exists'} end
if redis.call('SCARD', KEYS[10]) >= tonumber(ARGV[4]) then return {'too_many_calls'} end
local now = now_ms()
redis.call('HSET', KEYS[1], 'language', ARGV[6], 'modality', ARGV[7], 'metadata', ARGV[8], 'policy', ARGV[9],
  'closed', '0', 'next_seq', 0, 'audio_samples', 0, 'audio_held', 0, 'transcript_chars', 0,
  'transcript_end', '0.0', 'segments_received', 0, 'last_activity', now, 'opened', now, 'owner', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[9], now, ARGV[1])
redis.call('SADD', KEYS[10], ARGV[1])
return {'ok', redis.call('SCARD', KEYS[10])}
"""
)

# ARGV 4 seq, 5 digest, 6 "accept" or "check" (only say what the chunk would be), 7 keys' time to live (ms),
# 8 audio frames kept at most, 9 transcript characters kept at most, 10 digests remembered, 11 the chunk's
# frames (0: no audio), 12 its audio block, 13 its latest segment end ("" without segments), 14 its line count,
# then each line and its length in characters.
_ACCEPT = (
    _COMMON
    + """
local st = redis.call('HMGET', KEYS[1], 'closed', 'next_seq', 'owner')
if not st[1] then return {'unknown_call'} end
if st[1] == '1' then return {'closed_call'} end
local nxt = tonumber(st[2])
local seq = tonumber(ARGV[4])
if seq > nxt then return {'sequence_gap', nxt} end
local status = 'new'
if seq < nxt then
  local known = redis.call('HGET', KEYS[6], ARGV[4])
  if known and known ~= ARGV[5] then return {'out_of_order', nxt} end
  status = 'duplicate'
elseif ARGV[6] == 'check' then
  return {'new', nxt}
else
  local frames = tonumber(ARGV[11])
  if frames > 0 then
    redis.call('RPUSH', KEYS[2], ARGV[12])
    redis.call('RPUSH', KEYS[3], frames)
    local held = tonumber(redis.call('HGET', KEYS[1], 'audio_held')) + frames
    local most = tonumber(ARGV[8])
    -- drop the oldest blocks while the rest still hold the window (the reader cuts to the window)
    while redis.call('LLEN', KEYS[3]) > 1 do
      local first = tonumber(redis.call('LINDEX', KEYS[3], 0))
      if held - first < most then break end
      redis.call('LPOP', KEYS[3])
      redis.call('LPOP', KEYS[2])
      held = held - first
    end
    redis.call('HSET', KEYS[1], 'audio_held', held)
    redis.call('HINCRBY', KEYS[1], 'audio_samples', frames)
  end
  local n = tonumber(ARGV[14])
  if n > 0 then
    local chars = tonumber(redis.call('HGET', KEYS[1], 'transcript_chars'))
    for i = 0, n - 1 do
      redis.call('RPUSH', KEYS[4], ARGV[15 + 2 * i])
      redis.call('RPUSH', KEYS[5], ARGV[16 + 2 * i])
      chars = chars + tonumber(ARGV[16 + 2 * i]) + 1
    end
    -- the oldest turns go first, as CallSession drops them (the latest stays, however long)
    while chars > tonumber(ARGV[9]) and redis.call('LLEN', KEYS[5]) > 1 do
      chars = chars - tonumber(redis.call('LPOP', KEYS[5])) - 1
      redis.call('LPOP', KEYS[4])
    end
    redis.call('HSET', KEYS[1], 'transcript_chars', chars)
    redis.call('HINCRBY', KEYS[1], 'segments_received', n)
    if tonumber(ARGV[13]) > tonumber(redis.call('HGET', KEYS[1], 'transcript_end')) then
      redis.call('HSET', KEYS[1], 'transcript_end', ARGV[13])
    end
  end
  redis.call('HSET', KEYS[1], 'next_seq', nxt + 1)
  local remember = tonumber(ARGV[10])
  if remember > 0 then
    redis.call('HSET', KEYS[6], ARGV[4], ARGV[5])
    if seq - remember >= 0 then redis.call('HDEL', KEYS[6], seq - remember) end
  end
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'last_activity', now)
redis.call('ZADD', KEYS[9], now, ARGV[1])
take_over(st[3])
for i = 1, 7 do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end
local decisions = {}
if status == 'duplicate' then decisions = redis.call('LRANGE', KEYS[7], 0, -1) end
return {status, nxt, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[4], 0, -1), decisions,
  redis.call('EXISTS', KEYS[8]), redis.call('SCARD', KEYS[10])}
"""
)

# ARGV 4 "1" to read the audio blocks too
_LOAD = """
local state = redis.call('HGETALL', KEYS[1])
if #state == 0 then return {} end
local audio = {}
if ARGV[4] == '1' then audio = redis.call('LRANGE', KEYS[2], 0, -1) end
return {state, redis.call('LRANGE', KEYS[4], 0, -1), redis.call('LRANGE', KEYS[7], 0, -1),
  redis.call('GET', KEYS[8]) or '', audio}
"""

# ARGV 4 lease value, 5 "save", "close" or "expire", 6 PolicyState JSON, 7 verdict JSON, 8 a closed call's
# keys' time to live (ms), 9 idle time that lets a call expire (ms), 10 decision count, then each decision.
_COMMIT = (
    _COMMON
    + """
if redis.call('GET', KEYS[8]) ~= ARGV[4] then return {'lost_lease'} end
local st = redis.call('HMGET', KEYS[1], 'closed', 'owner', 'last_activity')
local mode = ARGV[5]
if not st[1] or (mode ~= 'save' and st[1] == '1') or
   (mode == 'expire' and now_ms() - tonumber(st[3]) < tonumber(ARGV[9])) then
  redis.call('DEL', KEYS[8])
  return {'refused'}
end
redis.call('HSET', KEYS[1], 'policy', ARGV[6])
for i = 1, tonumber(ARGV[10]) do redis.call('RPUSH', KEYS[7], ARGV[10 + i]) end
if mode ~= 'save' then
  redis.call('ZREM', KEYS[9], ARGV[1])
  if st[2] then redis.call('SREM', ARGV[2] .. ':owner:' .. st[2], ARGV[1]) end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
end
if mode == 'close' then
  -- kept until the TTL, to answer late chunks with closed_call and a second close with the verdict
  redis.call('HSET', KEYS[1], 'closed', '1', 'verdict', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[7], ARGV[8])
elseif mode == 'expire' then
  redis.call('DEL', KEYS[1], KEYS[7])
end
redis.call('DEL', KEYS[8])
return {'ok', redis.call('SCARD', KEYS[10])}
"""
)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV 1 idle time (ms), 2 most calls returned
_IDLE = """
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
"""


def encode_block(audio: np.ndarray) -> bytes:
    """One chunk's audio (frames, channels) as stored: PCM16 when that is exact (every PCM16 chunk), else float32."""
    channels = audio.shape[1]
    scaled = audio * np.float32(32768.0)
    pcm = np.rint(scaled)
    if np.array_equal(pcm, scaled) and pcm.min(initial=0) >= -32768 and pcm.max(initial=0) <= 32767:
        return b"h" + bytes([channels]) + pcm.astype("<i2").tobytes()
    return b"f" + bytes([channels]) + audio.astype("<f4").tobytes()


def decode_block(blob: bytes) -> np.ndarray:
    kind, channels, data = blob[:1], blob[1], blob[2:]
    if kind == b"h":
        return (np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)).reshape(
            -1, channels
        )
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(-1, channels)


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]) or "": _text(flat[i + 1]) or "" for i in range(0, len(flat), 2)}


def default_replica_id() -> str:
    """The pod's name (its host name), the process and a random part: unique per process, readable in Redis."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisStore(SessionStore):
    """Live calls in Redis (see the module's text for the keys and the atomic steps)."""

    shared = True

    def __init__(
        self,
        url: str,
        config: StoreConfig,
        *,
        max_calls: int,
        ttl_seconds: float,
        limits: SessionLimits,
        chunk_limits: ChunkLimits,
    ) -> None:
        super().__init__(
            max_calls=max_calls, ttl_seconds=ttl_seconds, limits=limits, chunk_limits=chunk_limits
        )
        self.url, self.config = url, config
        self.replica = config.replica_id or default_replica_id()
        self.prefix = config.key_prefix
        timeout = config.timeout_s
        # No retries inside the client: a timed-out script may have run, and the protocol's own retry (the
        # client resends the chunk) is the one that is safe to repeat.
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            client_name=f"teleguard:{self.replica}"[:64],
        )
        register = self.redis.register_script
        self._open, self._accept, self._load = register(_OPEN), register(_ACCEPT), register(_LOAD)
        self._commit, self._renew, self._release = register(_COMMIT), register(_RENEW), register(_RELEASE)
        self._idle = register(_IDLE)
        self.max_samples = round(limits.max_audio_seconds * SAMPLE_RATE)
        # an open call's keys outlive a sweeper that never comes (every replica gone) by this much, no more
        self.open_ttl_ms = round(max(ttl_seconds * 4, ttl_seconds + 60) * 1000)
        self.lease_ms = max(1, round(config.lease_seconds * 1000))

    def __repr__(self) -> str:
        return f"RedisStore({redact(self.url)}, replica {self.replica})"

    # --- plumbing --------------------------------------------------------------------------------------------

    def keys(self, call_id: str) -> list[str]:
        call = f"{self.prefix}:call:{call_id}"
        parts = ("audio", "frames", "lines", "lens", "digests", "decisions", "lease")
        return [
            call,
            *(f"{call}:{part}" for part in parts),
            f"{self.prefix}:open",
            f"{self.prefix}:owner:{self.replica}",
        ]

    async def _call(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """One store operation, bounded in time; any failure to reach Redis becomes StoreUnavailable."""
        try:
            async with asyncio.timeout(self.config.timeout_s * 2):
                return await step()
        except (RedisTimeout, TimeoutError) as err:
            raise StoreUnavailable(
                f"the session store did not answer {what} within {self.config.timeout_s:g} s ({err or 'timeout'})",
                kind="timeout",
            ) from None
        except (RedisError, OSError) as err:
            raise StoreUnavailable(f"the session store failed {what}: {type(err).__name__}: {err}") from None

    async def _script(self, what: str, script: Any, call_id: str, *args: Any) -> Any:
        keys = self.keys(call_id)
        return await self._call(
            what, lambda: script(keys=keys, args=[call_id, self.prefix, self.replica, *args])
        )

    async def start(self) -> None:
        await self.check()

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def check(self) -> None:
        await self._call("a ping", self.redis.ping)

    # --- reading a call back -----------------------------------------------------------------------------------

    def _session(
        self,
        call_id: str,
        state: dict[str, str],
        lines: list[Any],
        decisions: list[Any],
        leased: bool,
        audio: list[bytes] | None,
    ) -> CallSession:
        session = CallSession(
            call_id,
            language=state.get("language") or None,  # type: ignore[arg-type]
            modality=state.get("modality") or "auto",  # type: ignore[arg-type]
            metadata=json.loads(state.get("metadata") or "{}"),
            limits=self.limits,
            chunk_limits=self.chunk_limits,
        )
        session.restore(
            next_seq=int(state["next_seq"]),
            audio_samples=int(state["audio_samples"]),
            audio_held=int(state["audio_held"]),
            audio_blocks=None if audio is None else [decode_block(b) for b in audio],
            lines=[_text(line) or "" for line in lines],
            transcript_end=float(state["transcript_end"]),
            segments_received=int(state["segments_received"]),
        )
        session.set_policy_state(PolicyState.model_validate_json(state["policy"]))
        session.decisions = [Decision.model_validate_json(d) for d in decisions]
        session.evaluating = leased  # another evaluation holds the call (a holder reads it after leasing)
        if state.get("closed") == "1":
            session.close()
            if state.get("verdict"):
                session.verdict = Verdict.model_validate_json(state["verdict"])
        return session

    # --- the interface --------------------------------------------------------------------------------------------

    async def open(self, request: OpenCall) -> None:
        answer = await self._script(
            "opening a call",
            self._open,
            request.call_id,
            self.max_calls,
            self.open_ttl_ms,
            request.language or "",
            request.modality,
            json.dumps(request.metadata, ensure_ascii=False),
            PolicyState().model_dump_json(),
        )
        status = _text(answer[0])
        if status == "call_exists":
            raise exists_error(request.call_id)
        if status == "too_many_calls":
            raise full_error(self.max_calls)
        self.carried = int(answer[1])

    def _chunk_args(self, chunk: Chunk, decoded: DecodedChunk | None) -> list[Any]:
        frames, block, end = 0, b"", ""
        lines: list[Any] = []
        if decoded is not None:
            if decoded.audio is not None:
                frames, block = decoded.audio.shape[0], encode_block(decoded.audio)
            if decoded.segments:
                end = repr(float(max(s.end for s in decoded.segments)))
                for segment in decoded.segments:
                    line = render_segment(segment)
                    lines += [line, len(line)]
        return [
            chunk.seq,
            chunk_digest(chunk).hex(),
            "check" if decoded is None else "accept",
            self.open_ttl_ms,
            self.max_samples,
            self.limits.max_transcript_chars,
            self.limits.remember_chunks,
            frames,
            block,
            end or "-1",
            len(lines) // 2,
            *lines,
        ]

    async def receive(self, chunk: Chunk) -> Receipt:
        try:
            decoded: DecodedChunk | None = decode_chunk(chunk, self.chunk_limits)
            problem: RequestError | None = None
        except RequestError as err:
            # the sequence comes first, as for an in-memory call: ask the store what this chunk would be
            decoded, problem = None, err
        answer = await self._script(
            "taking a chunk", self._accept, chunk.call_id, *self._chunk_args(chunk, decoded)
        )
        status = _text(answer[0])
        if status == "unknown_call":
            raise unknown_error(chunk.call_id)
        if status == "closed_call":
            raise closed_error(chunk.call_id, chunk.seq)
        if status == "sequence_gap":
            raise gap_error(chunk.call_id, chunk.seq, int(answer[1]))
        if status == "out_of_order":
            raise conflict_error(chunk.call_id, chunk.seq)
        if problem is not None and status == "new":
            raise problem
        _, _, state, lines, decisions, leased, carried = answer
        self.carried = int(carried)
        session = self._session(chunk.call_id, _pairs(state), lines, decisions, bool(leased), None)
        return Receipt(status == "new", session)

    async def get(
        self, call_id: str, *, open_only: bool = True, audio: bool = False, lease: Lease | None = None
    ) -> CallSession:
        answer = await self._script("reading a call", self._load, call_id, "1" if audio else "0")
        if not answer:
            raise unknown_error(call_id)
        state, lines, decisions, held, blocks = answer
        others = bool(held) and (lease is None or _text(held) != lease.value)
        session = self._session(call_id, _pairs(state), lines, decisions, others, blocks if audio else None)
        if open_only and session.closed:
            raise RequestError("closed_call", f"call {call_id} is closed", field="call_id")
        return session

    async def lease(self, call_id: str, seq: int | None = None) -> Lease | None:
        lease = Lease(call_id, seq)
        key = self.keys(call_id)[7]
        taken = await self._call(
            "holding a call", lambda: self.redis.set(key, lease.value, nx=True, px=self.lease_ms)
        )
        return lease if taken else None

    async def holder(self, call_id: str) -> int | None:
        key = self.keys(call_id)[7]
        return lease_seq(_text(await self._call("reading a lease", lambda: self.redis.get(key))))

    async def renew(self, lease: Lease) -> bool:
        key = self.keys(lease.call_id)[7]
        done = await self._call(
            "renewing a lease", lambda: self._renew(keys=[key], args=[lease.value, self.lease_ms])
        )
        return bool(done)

    async def release(self, lease: Lease) -> None:
        key = self.keys(lease.call_id)[7]
        await self._call("releasing a lease", lambda: self._release(keys=[key], args=[lease.value]))

    async def commit(
        self,
        lease: Lease,
        session: CallSession,
        *,
        decisions_before: int,
        verdict: Verdict | None = None,
        expire: bool = False,
    ) -> bool:
        mode = "expire" if expire else "close" if verdict is not None else "save"
        new = [d.model_dump_json() for d in session.decisions[decisions_before:]]
        answer = await self._script(
            "storing an evaluation",
            self._commit,
            lease.call_id,
            lease.value,
            mode,
            session.policy_state().model_dump_json(),
            "" if verdict is None else verdict.model_dump_json(),
            round(self.ttl_seconds * 1000),
            round(self.ttl_seconds * 1000),
            len(new),
            *new,
        )
        if _text(answer[0]) != "ok":
            return False
        self.carried = int(answer[1])
        return True

    async def idle(self) -> list[str]:
        key = f"{self.prefix}:open"
        ids = await self._call(
            "listing idle calls", lambda: self._idle(keys=[key], args=[round(self.ttl_seconds * 1000), 200])
        )
        return [_text(i) or "" for i in ids]

    async def open_calls(self) -> int:
        return int(await self._call("counting calls", lambda: self.redis.zcard(f"{self.prefix}:open")))

    async def refresh(self) -> int:
        key = self.keys("-")[9]
        self.carried = int(await self._call("counting this replica's calls", lambda: self.redis.scard(key)))
        return self.carried

    async def hand_over(self) -> None:
        key = self.keys("-")[9]
        await self._call("handing calls over", lambda: self.redis.delete(key))
        self.carried = 0
