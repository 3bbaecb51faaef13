"""The Prometheus rules (promtool check + unit tests), the names they use, and DetectorMetrics itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from teleguard.contract.labels import FRAUD_TYPE_NAMES, SCENE_NAMES
from teleguard.serve.metrics import (
    DECISION_SLO_SECONDS,
    LATENCY_BUCKETS,
    REJECT_REASONS,
    TIME_TO_DETECTION_BUCKETS,
    DetectorMetrics,
    default_metrics,
    exported_sample_names,
)
from tests.support.prometheus_server import PROMTOOL, RULES_FILE

RULE_TESTS = sorted((RULES_FILE.parent / "tests").glob("*.yaml"))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES_FILE.read_text())["groups"]


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


# --- promtool -------------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests found"
    result = run_promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_rule() -> None:
    """Every recording rule is asserted on, and every alert both firing and not firing."""
    tested_exprs: list[str] = []
    alert_cases: dict[str, set[bool]] = {}
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../rules.yaml"], path
        for test in spec["tests"]:
            tested_exprs += [case["expr"] for case in test.get("promql_expr_test", [])]
            for case in test.get("alert_rule_test", []):
                alert_cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in all_rules():
        if "record" in rule:
            assert any(rule["record"] in expr for expr in tested_exprs), f"{rule['record']} is never tested"
        else:
            assert alert_cases.get(rule["alert"]) == {True, False}, (
                f"{rule['alert']}: {alert_cases.get(rule['alert'])}"
            )


# --- names in the PromQL --------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label names inside selectors
_RANGES = re.compile(r"\[[^\]]*\]")  # durations and subqueries' steps
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")  # label lists
# An identifier not glued to a number (1e3, 5m, 0x1f) nor part of a longer name.
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    ("and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool")
)
_NUMBER_WORDS = frozenset(("inf", "nan"))


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords or label names."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word in _KEYWORDS or word.lower() in _NUMBER_WORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):  # a function or an aggregation
            continue
        names.add(word)
    return names


def test_promql_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{le=~"3(\\\\.0)?", job="x"}[5m] offset 1h)))'
        " / on () group_left (instance) sum without (pod) (b:rec:ratio) > 1e3 and bool Inf"
        ' or max(c_total @ 1609746000) unless d{__name__="zz"} * 0x1F + label_replace(e, "f", "$1", "g", "h")'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b:rec:ratio", "c_total", "d", "e"}


def test_rules_name_only_exported_metrics() -> None:
    exported = exported_sample_names()
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    used: set[str] = set()
    for rule in all_rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule
        unknown = names - exported - records
        assert not unknown, f"{rule.get('record') or rule.get('alert')} uses unknown series {sorted(unknown)}"
        used |= names
    # The rules read what the dashboards and alerts are about: verdicts, both latencies, errors, detection time.
    assert {
        "teleguard_calls_completed_total",
        "teleguard_decision_latency_seconds_bucket",
        "teleguard_decision_latency_seconds_count",
        "teleguard_chunk_latency_seconds_bucket",
        "teleguard_engine_errors_total",
        "teleguard_model_calls_total",
        "teleguard_time_to_detection_seconds_bucket",
    } <= used


def test_alerts_have_severity_and_annotations() -> None:
    alerts = [rule for rule in all_rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == {
        "TeleguardFraudRateSpike",
        "TeleguardDecisionLatencySLOFastBurn",
        "TeleguardDecisionLatencySLOSlowBurn",
        "TeleguardEngineErrorRateHigh",
        "TeleguardSessionStoreErrors",
    }
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_slo_rules_match_the_bucket_prometheus_client_writes() -> None:
    """The SLO bucket exists, and the rules' le matcher matches how both client libraries spell it."""
    assert DECISION_SLO_SECONDS in LATENCY_BUCKETS
    text = RULES_FILE.read_text()
    patterns = set(re.findall(r'le=~"((?:\\.|[^"\\])*)"', text))
    assert len(patterns) == 1
    regex = next(iter(patterns)).replace("\\\\", "\\")  # PromQL string escapes -> RE2 regex
    assert re.fullmatch(regex, floatToGoString(DECISION_SLO_SECONDS))  # "3.0"
    assert re.fullmatch(regex, "3")  # Go clients and Prometheus 3
    assert not re.fullmatch(regex, "30.0")
    assert text.count("3(\\\\.0)?") == 4  # one per SLO window


# --- DetectorMetrics ------------------------------------------------------------------------------------------


def samples(metrics: DetectorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's text exposition, keyed by name and sorted labels."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metrics() -> DetectorMetrics:
    return DetectorMetrics(CollectorRegistry())


def test_buckets_fit_the_latencies() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 30.0
    assert sum(1 for b in LATENCY_BUCKETS if b < 0.005) >= 2  # below KServe's first bucket, for chunks
    assert sum(1 for b in LATENCY_BUCKETS if 0.5 <= b <= 5.0) >= 8  # around decisions and the 3 s SLO
    assert TIME_TO_DETECTION_BUCKETS[0] == 1.0 and TIME_TO_DETECTION_BUCKETS[-1] == 600.0
    assert list(TIME_TO_DETECTION_BUCKETS) == sorted(set(TIME_TO_DETECTION_BUCKETS))


def test_latency_histograms(metrics: DetectorMetrics) -> None:
    metrics.observe_chunk(0.0004)
    metrics.observe_chunk(0.002)
    metrics.observe_decision(2.8, round="is_fraud", label=False)
    metrics.observe_decision(3.5, round="is_fraud", label=False)
    got = samples(metrics)
    chunk = "teleguard_chunk_latency_seconds_bucket"
    assert got[(chunk, (("le", "0.001"),))] == 1
    assert got[(chunk, (("le", "0.0025"),))] == 2
    assert got[(chunk, (("le", "+Inf"),))] == 2
    assert got[("teleguard_chunks_total", ())] == 2
    decision = "teleguard_decision_latency_seconds_bucket"
    assert got[(decision, (("le", "2.5"),))] == 0
    assert got[(decision, (("le", "3.0"),))] == 1  # the SLO bucket, as the rules match it
    assert got[(decision, (("le", "4.0"),))] == 2
    assert got[("teleguard_decision_latency_seconds_count", ())] == 2
    assert got[("teleguard_decision_latency_seconds_sum", ())] == pytest.approx(6.3)
    bounds = {dict(labels)["le"] for name, labels in got if name == decision}
    assert bounds == {floatToGoString(b) for b in LATENCY_BUCKETS} | {"+Inf"}


def test_decision_labels_are_normalized_and_bounded(metrics: DetectorMetrics) -> None:
    metrics.observe_decision(0.5, round="fraud_type", label=True, scene="taxi", fraud_type="phishing")
    metrics.observe_decision(0.5, round="scene", label=None, scene="打车服务", fraud_type=None)
    metrics.observe_decision(0.5, round="weird", label="maybe", scene="a spaceship", fraud_type="alien fraud")
    got = samples(metrics)
    name = "teleguard_decisions_total"

    def key(**labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (name, tuple(sorted(labels.items())))

    assert got[key(round="fraud_type", label="fraud", scene="打车服务", fraud_type="钓鱼诈骗")] == 1
    assert got[key(round="scene", label="none", scene="打车服务", fraud_type="none")] == 1
    assert got[key(round="unknown", label="unknown", scene="unknown", fraud_type="unknown")] == 1
    # Free text never becomes a label value.
    for i in range(50):
        metrics.observe_decision(0.1, round=f"r{i}", label=f"l{i}", scene=f"s{i}", fraud_type=f"f{i}")
    assert sum(1 for n, _ in samples(metrics) if n == name) == 3


def test_calls_verdicts_and_time_to_detection(metrics: DetectorMetrics) -> None:
    for _ in range(3):
        metrics.call_opened()
    metrics.alert("bank fraud")
    metrics.call_closed("fraud", 12.0)
    metrics.call_closed("normal", 40.0)  # time to detection is for fraud verdicts only
    got = samples(metrics)
    assert got[("teleguard_active_calls", ())] == 1
    assert got[("teleguard_calls_completed_total", (("verdict", "fraud"),))] == 1
    assert got[("teleguard_calls_completed_total", (("verdict", "normal"),))] == 1
    assert got[("teleguard_calls_completed_total", (("verdict", "undecided"),))] == 0
    assert got[("teleguard_alerts_total", (("fraud_type", "银行诈骗"),))] == 1
    assert got[("teleguard_time_to_detection_seconds_bucket", (("le", "10.0"),))] == 0
    assert got[("teleguard_time_to_detection_seconds_bucket", (("le", "15.0"),))] == 1
    assert got[("teleguard_time_to_detection_seconds_count", ())] == 1
    metrics.call_closed("undecided", expired=True)
    got = samples(metrics)
    assert got[("teleguard_calls_expired_total", ())] == 1
    assert got[("teleguard_active_calls", ())] == 0
    with pytest.raises(ValueError):
        metrics.call_closed("probably fraud")
    assert samples(metrics)[("teleguard_active_calls", ())] == 0


def test_engine_and_rejections(metrics: DetectorMetrics) -> None:
    got = samples(metrics)
    # Closed label sets exist at zero before anything happens, so rate() sees their first increase.
    for reason in REJECT_REASONS:
        assert got[("teleguard_rejected_requests_total", (("reason", reason),))] == 0
    for kind in ("timeout", "error"):
        assert got[("teleguard_engine_errors_total", (("kind", kind),))] == 0
    for fraud_type in (*FRAUD_TYPE_NAMES, "none", "unknown"):
        assert got[("teleguard_alerts_total", (("fraud_type", fraud_type),))] == 0
    metrics.model_call(tokens=120)
    metrics.model_call()
    metrics.engine_error("timeout")
    metrics.engine_error("segfault")
    metrics.rejected("wrong_sample_rate")
    metrics.rejected("a reason nobody wrote down")
    got = samples(metrics)
    assert got[("teleguard_model_calls_total", ())] == 2
    assert got[("teleguard_generated_tokens_total", ())] == 120
    assert got[("teleguard_engine_errors_total", (("kind", "timeout"),))] == 1
    assert got[("teleguard_engine_errors_total", (("kind", "error"),))] == 1
    assert got[("teleguard_rejected_requests_total", (("reason", "wrong_sample_rate"),))] == 1
    assert got[("teleguard_rejected_requests_total", (("reason", "other"),))] == 1
    assert sum(1 for name, _ in got if name == "teleguard_rejected_requests_total") == len(REJECT_REASONS)


def test_exported_sample_names_match_the_exposition(metrics: DetectorMetrics) -> None:
    metrics.observe_chunk(0.01)
    metrics.observe_decision(1.0, round="scene", label=None, scene=SCENE_NAMES[0])
    metrics.call_opened()
    metrics.call_closed("fraud", 30.0)
    metrics.model_call(tokens=1)
    metrics.rejected("empty_chunk")
    metrics.call_closed("normal", expired=True)
    exposed = {name for name, _ in samples(metrics)}
    assert exposed == exported_sample_names()
    assert all(name.startswith("teleguard_") for name in exposed)


def test_default_metrics_use_the_default_registry() -> None:
    """KServe's /metrics serves prometheus_client's default registry; registering twice would fail."""
    metrics = default_metrics()
    assert metrics is default_metrics()
    assert metrics.registry is REGISTRY
    assert "teleguard_active_calls" in generate_latest(REGISTRY).decode()
