"""A real Prometheus scrapes the served detector while a client streams calls: PromQL agrees with the client.

The detector runs on KServe's REST server on loopback with a scripted engine whose answers and latencies are
known (fraud for calls named "fraud-*"; 0.3 s per engine call, so a normal evaluation takes ~0.3 s and a fraud
evaluation, which also asks round 3, ~0.6 s: both well inside one latency bucket). Prometheus (Debian package,
127.0.0.1 only) scrapes /metrics every second with the project's rules loaded. The fraud rate PromQL gives
equals the fraud-verdict ratio the client saw, and the p99 decision latency from histogram_quantile equals what
the client's own latencies give in the same buckets.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from teleguard.serve.metrics import LATENCY_BUCKETS, DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.server import ServeConfig, build_server
from tests.support.detector import ScriptedEngine, running, segments
from tests.support.prometheus_server import (
    PROMETHEUS,
    RULES_FILE,
    PrometheusServer,
    bucket_of,
    bucket_quantile,
    close_to,
    sample_quantile,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)

FRAUD_CALLS, NORMAL_CALLS, TURNS = 3, 5, 4
ENGINE_SECONDS = 0.3


def stream_call(url: str, call_id: str, observed: list[float], verdicts: dict[str, bool]) -> None:
    """One call over the REST routes; records the latency of every chunk that came back with decisions."""
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v1/calls", json={"call_id": call_id}).status_code == 201
        for seq, seg in enumerate(segments(TURNS)):
            start = time.perf_counter()
            answer = http.post(f"/v1/calls/{call_id}/chunks", json={"seq": seq, "segments": seg})
            elapsed = time.perf_counter() - start
            assert answer.status_code == 200, answer.text
            if answer.json()["decisions"]:
                observed.append(elapsed)
        verdicts[call_id] = http.post(f"/v1/calls/{call_id}/close").json()["verdict"]["is_fraud"]


def test_promql_fraud_rate_and_p99_latency_agree_with_the_client(tmp_path: Path) -> None:
    engine = ScriptedEngine(delay=ENGINE_SECONDS)
    config = ServeConfig(
        port=0, policy=DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never", max_tokens=64)
    )
    metrics = DetectorMetrics(CollectorRegistry())
    server = build_server(config, engine_factory=lambda _config: engine, metrics=metrics)
    with running(server):
        target = server.url.removeprefix("http://")
        with PrometheusServer([target], tmp_path / "prometheus", rule_files=[RULES_FILE]) as prom:
            # rate() counts increases between scrapes: let Prometheus see the zeros before any call ends.
            prom.wait_for('sum(teleguard_calls_completed_total{job="teleguard"})', lambda v: v == 0)

            observed: list[float] = []
            verdicts: dict[str, bool] = {}
            calls = [f"fraud-{i}" for i in range(FRAUD_CALLS)] + [f"normal-{i}" for i in range(NORMAL_CALLS)]
            threads = [
                threading.Thread(target=stream_call, args=(server.url, c, observed, verdicts)) for c in calls
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(verdicts) == sorted(calls)
            client_fraud_rate = sum(verdicts.values()) / len(verdicts)
            assert client_fraud_rate == FRAUD_CALLS / len(
                calls
            )  # the scripted engine's verdicts came through
            # fraud calls alert at their first turn and stop; normal calls are evaluated at every turn
            assert len(observed) == FRAUD_CALLS + NORMAL_CALLS * TURNS

            prom.wait_for("sum(teleguard_calls_completed_total)", lambda v: v == len(calls))
            prom.wait_for("teleguard_decision_latency_seconds_count", lambda v: v == len(observed))
            prom.wait_for("teleguard_active_calls", lambda v: v == 0, timeout=5)

            direct = prom.value(
                'sum(rate(teleguard_calls_completed_total{verdict="fraud"}[1m]))'
                " / sum(rate(teleguard_calls_completed_total[1m]))"
            )
            assert direct == pytest.approx(client_fraud_rate, rel=1e-9)
            prom.wait_for("teleguard:fraud_rate:ratio_rate5m", close_to(client_fraud_rate))

            # Every client latency lands in the bucket of the server's own observation (the transport adds
            # milliseconds to 0.3 s and 0.6 s evaluations), so the quantile of the buckets is the same.
            expected_p99 = bucket_quantile(0.99, observed, LATENCY_BUCKETS)
            p99 = prom.value(
                "histogram_quantile(0.99, sum by (le) (rate(teleguard_decision_latency_seconds_bucket[1m])))"
            )
            assert p99 is not None and math.isclose(p99, expected_p99, rel_tol=1e-9)
            lower, upper = bucket_of(sample_quantile(0.99, observed), LATENCY_BUCKETS)
            assert lower <= p99 <= upper
            prom.wait_for("teleguard:decision_latency_seconds:p99_5m", close_to(expected_p99))

            # the rest of what the detector exported, as seen by Prometheus
            for expr, expected in (
                ('sum(teleguard_alerts_total{fraud_type="银行诈骗"})', FRAUD_CALLS),
                ("teleguard_chunks_total", len(calls) * TURNS),
                # one engine call per evaluation, and round 3 for each fraud call
                ("teleguard_model_calls_total", len(observed) + FRAUD_CALLS),
                ("teleguard_generated_tokens_total", 7 * FRAUD_CALLS),
                ("sum(teleguard_engine_errors_total)", 0),
            ):
                prom.wait_for(expr, lambda v, expected=expected: v == expected, timeout=5)
            targets: list[dict[str, Any]] = prom.active_targets()
            assert [t["health"] for t in targets] == ["up"]
