"""A real Prometheus scrapes DetectorMetrics and evaluates the rules: the PromQL answers match what was observed.

Prometheus (from the Debian package) and the metrics endpoint both bind 127.0.0.1 only; storage lives in
tmp_path. Everything is scraped and evaluated every second, so the test takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from teleguard.serve.metrics import LATENCY_BUCKETS, TIME_TO_DETECTION_BUCKETS, DetectorMetrics
from tests.support.prometheus_server import (
    PROMETHEUS,
    RULES_FILE,
    MetricsEndpoint,
    PrometheusServer,
    bucket_of,
    bucket_quantile,
    close_to,
    sample_quantile,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)

# 32 calls: 9 fraud, 19 normal and 2 undecided verdicts (fraud rate 0.3), 2 still open.
FRAUD_CALLS, NORMAL_CALLS, UNDECIDED_CALLS, OPEN_CALLS = 9, 19, 2, 2
TIMES_TO_DETECTION = (4.0, 8.0, 12.0, 15.0, 22.0, 30.0, 41.0, 60.0, 95.0)
# 100 decisions, 2 of them slower than the 3 s SLO.
DECISION_LATENCIES = (0.3,) * 50 + (0.9,) * 30 + (1.8,) * 15 + (2.7,) * 3 + (4.5,) * 2
CHUNK_LATENCIES = (0.0004,) * 495 + (0.6,) * 5
MODEL_CALLS, TIMEOUTS, FAILURES = 120, 4, 2


def drive(metrics: DetectorMetrics) -> None:
    """The known traffic the assertions below are computed from."""
    for _ in range(FRAUD_CALLS + NORMAL_CALLS + UNDECIDED_CALLS + OPEN_CALLS):
        metrics.call_opened()
    for seconds in CHUNK_LATENCIES:
        metrics.observe_chunk(seconds)
    for i, seconds in enumerate(DECISION_LATENCIES):
        fraud = i % 10 == 0
        metrics.observe_decision(
            seconds,
            round="is_fraud",
            label=fraud,
            scene="ride hailing",
            fraud_type="phishing" if fraud else None,
        )
    for i in range(MODEL_CALLS):
        metrics.model_call(tokens=50)
        if i < TIMEOUTS:
            metrics.engine_error("timeout")
        elif i < TIMEOUTS + FAILURES:
            metrics.engine_error("error")
    for seconds in TIMES_TO_DETECTION:
        metrics.alert("phishing")
        metrics.call_closed("fraud", seconds)
    for _ in range(NORMAL_CALLS):
        metrics.call_closed("normal")
    metrics.call_closed("undecided")
    metrics.call_closed("undecided", expired=True)


@pytest.fixture
def detector_metrics() -> Iterator[tuple[DetectorMetrics, MetricsEndpoint]]:
    metrics = DetectorMetrics(CollectorRegistry())
    with MetricsEndpoint(metrics.registry) as endpoint:
        yield metrics, endpoint


def test_prometheus_scrapes_detector_metrics_and_evaluates_the_rules(
    detector_metrics: tuple[DetectorMetrics, MetricsEndpoint], tmp_path: Path
) -> None:
    metrics, endpoint = detector_metrics
    with PrometheusServer([endpoint.target], tmp_path / "prometheus", rule_files=[RULES_FILE]) as prom:
        # rate() counts increases between scrapes: let Prometheus see the zeros before any traffic.
        prom.wait_for('sum(teleguard_calls_completed_total{job="teleguard"})', lambda v: v == 0)
        drive(metrics)
        calls = FRAUD_CALLS + NORMAL_CALLS + UNDECIDED_CALLS
        prom.wait_for("sum(teleguard_calls_completed_total)", lambda v: v == calls)
        prom.wait_for("teleguard_decision_latency_seconds_count", lambda v: v == len(DECISION_LATENCIES))
        prom.wait_for("teleguard_model_calls_total", lambda v: v == MODEL_CALLS)
        # Polled, not read once: a scrape may land between two updates of one call_closed.
        for expr, expected in (
            ("teleguard_active_calls", OPEN_CALLS),
            ("sum(teleguard_engine_errors_total)", TIMEOUTS + FAILURES),
            ("teleguard_calls_expired_total", 1),
            ("teleguard_generated_tokens_total", 50 * MODEL_CALLS),
            ('teleguard_alerts_total{fraud_type="钓鱼诈骗"}', FRAUD_CALLS),
            ('sum(teleguard_decisions_total{label="fraud", scene="打车服务"})', 10),
            ("teleguard_chunks_total", len(CHUNK_LATENCIES)),
        ):
            prom.wait_for(expr, lambda v, expected=expected: v == expected, timeout=5)

        # The fraud rate, asked directly and as the recording rules evaluated by the server.
        fraud_rate = FRAUD_CALLS / calls
        direct = prom.value(
            'sum(rate(teleguard_calls_completed_total{verdict="fraud"}[1m]))'
            " / sum(rate(teleguard_calls_completed_total[1m]))"
        )
        assert direct == pytest.approx(fraud_rate, rel=1e-9)
        prom.wait_for("teleguard:fraud_rate:ratio_rate5m", close_to(fraud_rate))
        prom.wait_for("teleguard:fraud_rate:ratio_rate1h", close_to(fraud_rate))

        # p99 decision latency: what the buckets give, and within the bucket of the observed p99.
        p99 = prom.wait_for(
            "teleguard:decision_latency_seconds:p99_5m",
            close_to(bucket_quantile(0.99, DECISION_LATENCIES, LATENCY_BUCKETS)),
        )
        lower, upper = bucket_of(sample_quantile(0.99, DECISION_LATENCIES), LATENCY_BUCKETS)
        assert p99 is not None and lower <= p99 <= upper
        for q, name in ((0.5, "p50"), (0.95, "p95")):
            expected = bucket_quantile(q, DECISION_LATENCIES, LATENCY_BUCKETS)
            prom.wait_for(f"teleguard:decision_latency_seconds:{name}_5m", close_to(expected))
        prom.wait_for(
            "teleguard:chunk_latency_seconds:p99_5m",
            close_to(bucket_quantile(0.99, CHUNK_LATENCIES, LATENCY_BUCKETS)),
        )
        prom.wait_for(
            "teleguard:time_to_detection_seconds:p50_1h",
            close_to(bucket_quantile(0.5, TIMES_TO_DETECTION, TIME_TO_DETECTION_BUCKETS)),
        )

        # The SLO rules find prometheus_client's le="3.0" bucket: 2 of 100 decisions were slower.
        slow = sum(1 for x in DECISION_LATENCIES if x > 3.0) / len(DECISION_LATENCIES)
        for window in ("5m", "30m", "1h", "6h"):
            prom.wait_for(f"teleguard:decision_latency_slo_errors:ratio_rate{window}", close_to(slow))
        prom.wait_for("teleguard:engine_error_ratio:rate5m", close_to((TIMEOUTS + FAILURES) / MODEL_CALLS))

        # The rules file loaded whole, every rule evaluated without error, and this traffic alerts on nothing.
        expected_groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
        groups = {group["name"]: group for group in prom.rule_groups()}
        assert sorted(groups) == sorted(group["name"] for group in expected_groups)
        for expected in expected_groups:
            rules = groups[expected["name"]]["rules"]
            assert [r["name"] for r in rules] == [
                r.get("record") or r.get("alert") for r in expected["rules"]
            ]
            for rule in rules:
                assert rule["health"] == "ok", rule
        assert prom.alerts() == []
        targets = prom.active_targets()
        assert [t["health"] for t in targets] == ["up"]
        assert targets[0]["scrapeUrl"].startswith("http://127.0.0.1:")
