"""Many concurrent calls against one server: no decision is lost or counted twice.

24 calls of 20 chunks each stream at once through `teleguard.serve.client.replay_call`, half over the WebSocket
and half over the REST routes, some of them resending chunks they already sent (a client that lost an ack).
The engine is scripted (fraud for calls named "fraud-*", a few milliseconds per engine call), so the test is
about the server's bookkeeping, not the model. What every client saw is reconciled with the server's
Prometheus counters read from /metrics: chunks, evaluations, completed calls by verdict, engine invocations.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.serve.client import ReplayResult, replay_call, transcript_script
from tests.support.detector import ScriptedEngine, running, scripted_server

CALLS, CHUNKS = 24, 20
RESEND = (0, 3, 11, 19)  # chunks every fourth call sends twice
SPEED = 100.0  # 2 s turns: a chunk every 20 ms


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics summed by name and labels ("name{k=v,...}") and by name alone."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            for key in (sample.name, f"{sample.name}{{{labels}}}"):
                out[key] = out.get(key, 0.0) + sample.value
    return out


def call_script(i: int) -> tuple[str, object]:
    fraud = i % 3 == 0  # 8 fraud calls, 16 normal
    record = CallRecord(
        call_id=f"load/{i}",
        source="test",
        turns=tuple(
            Turn(
                speaker="left" if t % 2 == 0 else "right",
                text=f"第{t}句话，通话{i}。",
                start=2.0 * t,
                end=2.0 * t + 1.8,
            )
            for t in range(CHUNKS)
        ),
        labels=CallLabels(is_fraud=fraud),
    )
    return f"{'fraud' if fraud else 'normal'}-{i}", transcript_script(record)


def test_concurrent_calls_lose_and_double_count_nothing() -> None:
    engine = ScriptedEngine(delay=0.003)
    with running(scripted_server(engine, max_calls=CALLS)) as server:
        before = scrape(server.url)

        async def main() -> list[ReplayResult]:
            jobs = []
            for i in range(CALLS):
                call_id, script = call_script(i)
                jobs.append(
                    replay_call(
                        server.url,
                        script,  # type: ignore[arg-type]
                        speed=SPEED,
                        transport="ws" if i % 2 == 0 else "http",
                        call_id=call_id,
                        resend=RESEND if i % 4 == 1 else (),
                        timeout=30,
                    )
                )
            return list(await asyncio.gather(*jobs))

        started = time.perf_counter()
        results = asyncio.run(main())
        elapsed = time.perf_counter() - started
        after = scrape(server.url)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert len(results) == CALLS and elapsed < 20
    resent = 0
    for r in results:
        # every chunk acknowledged once as new; each resend answered as a duplicate, nothing else
        assert sorted(c.seq for c in r.chunks) == list(range(CHUNKS))
        assert all(c.acked_at is not None for c in r.chunks)
        resent_here = [c.seq for c in r.chunks if c.resent]
        assert resent_here == [c.seq for c in r.chunks if c.duplicate_acked]
        resent += len(resent_here)
        # the verdict counts what the client received: each decision once, resends not counted again
        assert r.verdict["chunks"] == CHUNKS and r.verdict["decisions"] == len(r.decisions)
        assert len(
            {(d.decision["seq"], d.decision["round"], d.decision["audio_time"]) for d in r.decisions}
        ) == len(r.decisions)
        fraud = r.call_id.startswith("fraud")
        assert r.verdict["is_fraud"] is fraud
        if fraud:  # the first evaluation alerts, round 3 names the type, and the call is not evaluated again
            assert [d.decision["round"] for d in r.decisions] == ["scene", "is_fraud", "fraud_type"]
        else:
            assert r.evaluations >= 1
    assert resent == len(RESEND) * sum(1 for i in range(CALLS) if i % 4 == 1)
    # the server repeated the decisions of resent chunks; the clients recognized them
    assert sum(r.repeated_decisions for r in results) >= len(RESEND)

    # the server's counters agree with the clients
    assert delta("teleguard_chunks_total") == CALLS * CHUNKS  # resends are not chunks
    assert delta("teleguard_decisions_total") == sum(r.evaluations for r in results)
    assert delta("teleguard_model_calls_total") == sum(r.model_invocations for r in results)
    fraud_calls = sum(1 for r in results if r.verdict["is_fraud"])
    assert delta("teleguard_calls_completed_total") == CALLS
    assert delta("teleguard_calls_completed_total{verdict=fraud}") == fraud_calls == CALLS // 3
    assert delta("teleguard_calls_completed_total{verdict=normal}") == CALLS - fraud_calls
    assert delta("teleguard_alerts_total") == fraud_calls
    assert delta("teleguard_rejected_requests_total") == 0 and delta("teleguard_engine_errors_total") == 0
    assert after["teleguard_active_calls"] == before.get("teleguard_active_calls", 0.0)
    assert delta("teleguard_chunk_latency_seconds_count") == CALLS * CHUNKS
    assert delta("teleguard_decision_latency_seconds_count") == sum(r.evaluations for r in results)
    # every engine invocation the scripted engine saw is one the server counted
    assert len(engine.batches) == delta("teleguard_model_calls_total")
