"""Concurrent live calls against a running `teleguard serve`: the load sweep the engine benchmark and the GPU
check share.

A level streams `calls` calls at once with `teleguard.serve.client.replay_call` (the client users run) and
measures what a user meets: decision latency (from sending the chunk or close that triggered a decision to
its arrival, client side), decisions per second over the level's wall time, and every call's verdict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.serve.client import (
    CallScript,
    ReplayResult,
    audio_script,
    percentile,
    replay_call,
    transcript_script,
)

TURN = "您好，我是工商银行客服，您的账户出现异常交易，需要您配合核实一下身份信息。"


def transcript_call(i: int, turns: int, seconds_per_turn: float = 2.0) -> CallScript:
    """A call of `turns` distinct turns (`seconds_per_turn` each), so no two calls share a prompt."""
    record = CallRecord(
        call_id=f"load/{i}",
        source="bench",
        turns=tuple(
            Turn(
                speaker="left" if t % 2 == 0 else "right",
                text=f"{TURN}（{i}-{t}）",
                start=t * seconds_per_turn,
                end=(t + 1) * seconds_per_turn - 0.2,
            )
            for t in range(turns)
        ),
        labels=CallLabels(is_fraud=i % 2 == 0),
    )
    return transcript_script(record)


def audio_call(i: int, seconds: float, chunk_seconds: float = 1.0) -> CallScript:
    """`seconds` of two-party call audio (a tone per channel and noise, different per call) in 1-s chunks."""
    rate = 16_000
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(i)
    tones = np.stack(
        [0.3 * np.sin(2 * np.pi * (300 + i) * t), 0.3 * np.sin(2 * np.pi * (500 + i) * t)], axis=1
    )
    audio = (tones + rng.normal(0.0, 0.02, size=tones.shape)).astype(np.float32)
    return audio_script(
        audio,
        source_id=f"load/audio-{i}",
        chunk_seconds=chunk_seconds,
        labels=CallLabels(is_fraud=i % 2 == 0),
    )


def _ms(values: Sequence[float]) -> dict[str, float | int | None]:
    def q(p: float) -> float | None:
        value = percentile(values, p)
        return None if value is None else round(value * 1000, 1)

    return {"p50_ms": q(50), "p99_ms": q(99), "max_ms": q(100), "n": len(values)}


async def _level(
    url: str, scripts: Sequence[CallScript], *, speed: float, transport: str, timeout: float
) -> tuple[list[ReplayResult | BaseException], float]:
    start = time.perf_counter()
    results = await asyncio.gather(
        *(
            replay_call(url, s, speed=speed, transport=transport, timeout=timeout)  # type: ignore[arg-type]
            for s in scripts
        ),
        return_exceptions=True,
    )
    return list(results), time.perf_counter() - start


def run_level(
    url: str,
    calls: int,
    make_call: Callable[[int], CallScript],
    *,
    speed: float = 1.0,
    transport: str = "http",
    timeout: float = 120.0,
    first: int = 0,
) -> dict[str, Any]:
    """Stream `calls` calls at once (numbered from `first`); the level's figures."""
    scripts = [make_call(first + i) for i in range(calls)]
    results, wall = asyncio.run(_level(url, scripts, speed=speed, transport=transport, timeout=timeout))
    done = [r for r in results if isinstance(r, ReplayResult)]
    failed = [r for r in results if not isinstance(r, ReplayResult)]
    latencies = [d.latency_s for r in done for d in r.decisions]
    decisions = len(latencies)
    return {
        "concurrent_calls": calls,
        "calls_with_verdict": sum(1 for r in done if r.verdict),
        "failed_calls": len(failed),
        "errors": sorted({f"{type(e).__name__}: {e}"[:200] for e in failed}),
        "decisions": decisions,
        "model_invocations": sum(r.model_invocations for r in done),
        "wall_s": round(wall, 2),
        "decisions_per_s": round(decisions / wall, 2) if wall > 0 else None,
        "decision_latency": _ms(latencies),
        "chunk_round_trip": _ms(
            [c.round_trip_s for r in done for c in r.chunks if c.round_trip_s is not None]
        ),
    }


def within(level: dict[str, Any], p99_limit_s: float) -> bool:
    """Whether a level held: every call got its verdict and the p99 decision latency kept to the limit."""
    p99 = level["decision_latency"]["p99_ms"]
    return (
        level["failed_calls"] == 0
        and level["calls_with_verdict"] == level["concurrent_calls"]
        and p99 is not None
        and p99 <= p99_limit_s * 1000
    )


def sweep(
    url: str,
    levels: Sequence[int],
    make_call: Callable[[int], CallScript],
    *,
    p99_limit_s: float | None = None,
    deadline: float | None = None,
    on_level: Callable[[dict[str, Any]], None] = lambda _level: None,
    **options: Any,
) -> list[dict[str, Any]]:
    """`run_level` at each level in turn; stops after the first level over `p99_limit_s` (when given) or once
    `deadline` (time.monotonic()) has passed. Calls are numbered across levels, so no prompt repeats."""
    out: list[dict[str, Any]] = []
    first = 0
    for calls in levels:
        if deadline is not None and time.monotonic() > deadline:
            break
        level = run_level(url, calls, make_call, first=first, **options)
        first += calls
        out.append(level)
        on_level(level)
        if p99_limit_s is not None and not within(level, p99_limit_s):
            break
    return out


def largest_within(levels: Sequence[dict[str, Any]], p99_limit_s: float) -> int | None:
    """The largest concurrency whose level held (and every smaller one measured held too)."""
    best = None
    for level in sorted(levels, key=lambda lv: lv["concurrent_calls"]):
        if not within(level, p99_limit_s):
            break
        best = level["concurrent_calls"]
    return best
