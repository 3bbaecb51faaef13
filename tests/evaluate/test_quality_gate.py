"""The quality gate's checks (teleguard.pipeline.steps.registration.gate_checks): the deployed detector's live figures and the
offline well-formed rate against the pipeline's thresholds."""

from __future__ import annotations

from teleguard.pipeline.steps.registration import GATE_FIGURES, gate_checks

THRESHOLDS = {
    "min_live_accuracy": 0.95,
    "max_false_alarm_rate": 0.05,
    "min_live_fraud_type_accuracy": 0.6,
    "min_flagged_within_half": 0.8,
    "min_well_formed": 0.9,
}
GOOD = {
    "well_formed_rate": 0.97,
    "live": {
        "live_verdict_accuracy": 0.99,
        "live_false_alarm_rate": 0.05,  # at the limit: passes
        "live_fraud_type_accuracy": 0.6,
        "live_flagged_within_half": 0.85,
    },
}


def test_every_threshold_is_checked_at_its_limit() -> None:
    checks = gate_checks(GOOD, THRESHOLDS)
    assert [c["parameter"] for c in checks] == [p for p, _, _ in GATE_FIGURES] == list(THRESHOLDS)
    assert all(c["passed"] for c in checks)


def test_a_figure_past_its_limit_or_missing_fails_its_check_only() -> None:
    worse = {**GOOD, "live": {**GOOD["live"], "live_false_alarm_rate": 0.0501}}
    failed = [c["parameter"] for c in gate_checks(worse, THRESHOLDS) if not c["passed"]]
    assert failed == ["max_false_alarm_rate"]
    missing = {**GOOD, "live": {k: v for k, v in GOOD["live"].items() if k != "live_fraud_type_accuracy"}}
    [check] = [c for c in gate_checks(missing, THRESHOLDS) if not c["passed"]]
    assert check["parameter"] == "min_live_fraud_type_accuracy" and check["value"] is None
    # no live evaluation at all: every live check fails, the offline one still passes
    offline_only = gate_checks({"well_formed_rate": 0.97}, THRESHOLDS)
    assert [c["passed"] for c in offline_only] == [False, False, False, False, True]
