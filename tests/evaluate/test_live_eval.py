"""Live evaluation (teleguard.evaluate.live) and the TF-IDF baseline (teleguard.evaluate.baseline).

The replays run the real `Detector` with a scripted engine whose answers are fixed per call and turn, so every
live figure has a value worked out by hand below. The baseline is trained and scored on shared TeleAntiFraud
calls (skipped without them).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from teleguard.contract import Round, Stage, format_answer
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.data.timing import estimate_times
from teleguard.engines.contract import EngineRequest, Generation
from teleguard.engines.wrappers import MicroBatcher
from teleguard.evaluate.live import (
    FIGURES,
    CallResult,
    as_deployed,
    live_figures,
    live_markdown,
    live_metrics,
    monitoring_policy,
    pick_threshold,
    read_results,
    reliability,
    replay_calls,
    threshold_sweep,
    write_live_report,
    write_results,
)
from teleguard.serve.policy import DecisionPolicy
from teleguard.tiny_models import TinyModel
from tests.support.paths import TRANSCRIPTS_DIR

TURN_S = 10.0  # every scripted turn lasts 10 s: turn k ends at 10k s
FRAUD_CUE = "FRAUDCUE"  # in the turn from which the scripted engine answers "fraud"


# --- the scripted calls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One call and how the scripted engine answers about it."""

    name: str
    turns: int
    labels: CallLabels
    cue_turn: int | None  # 1-based turn holding FRAUD_CUE (None: never)
    fraud_confidence: float = 0.9  # is_fraud true, once the cue is in the transcript
    normal_confidence: float | None = 0.8  # is_fraud false before that; None: a null answer
    fraud_type: str | None = None  # the engine's round-3 answer
    scene: str = "咨询客服"  # the engine's scene answer


SCRIPTS = (
    # fraud calls: alerted at 30 s of 80 (0.375), at 20 s of 100 (0.2), at 60 s of 60 (1.0), and missed
    Script("CALLA", 8, CallLabels(is_fraud=True, fraud_type="银行诈骗"), 3, fraud_type="银行诈骗"),
    Script("CALLB", 10, CallLabels(is_fraud=True, fraud_type="投资诈骗"), 2, fraud_type="投资诈骗"),
    Script("CALLC", 6, CallLabels(is_fraud=True, fraud_type="彩票诈骗"), 6, fraud_type="银行诈骗"),
    # fraud said at turn 3 but with confidence 0.3, below the 0.5 threshold: missed at 0.5
    Script("CALLD", 5, CallLabels(is_fraud=True, fraud_type="邮件诈骗"), 3, fraud_confidence=0.3),
    # normal calls: right, a false alarm at turn 4 (confidence 0.7), and undecided (null answers)
    Script(
        "CALLE",
        4,
        CallLabels(is_fraud=False, scene="外卖服务"),
        None,
        normal_confidence=0.95,
        scene="外卖服务",
    ),
    Script(
        "CALLF", 6, CallLabels(is_fraud=False, scene="打车服务"), 4, fraud_confidence=0.7, scene="打车服务"
    ),
    Script(
        "CALLG",
        3,
        CallLabels(is_fraud=False, scene="日常购物"),
        None,
        normal_confidence=None,
        scene="订餐服务",
    ),
)
BY_NAME = {s.name: s for s in SCRIPTS}


def record_of(script: Script) -> CallRecord:
    turns = tuple(
        Turn(
            speaker="left" if k % 2 else "right",
            text=f"{script.name} 第{k}句" + (f" {FRAUD_CUE}" if k == script.cue_turn else ""),
            start=(k - 1) * TURN_S,
            end=k * TURN_S,
        )
        for k in range(1, script.turns + 1)
    )
    return CallRecord(call_id=f"scripted/{script.name}", source="test", turns=turns, labels=script.labels)


CALLS = [record_of(s) for s in SCRIPTS]


def user_text(request: EngineRequest) -> str:
    return "\n".join(m["content"] for m in request.messages if m["role"] == "user")


def answer(request: EngineRequest) -> str:
    text = user_text(request)
    [name] = set(re.findall(r"CALL[A-G]", text))
    script = BY_NAME[name]
    if request.round is Round.SCENE:
        return format_answer(Round.SCENE, script.scene, stage=Stage.LATE, confidence=0.9, think="场景")
    if request.round is Round.FRAUD_TYPE:
        return format_answer(
            Round.FRAUD_TYPE, script.fraud_type, stage=Stage.LATE, confidence=0.9, think="类型"
        )
    if FRAUD_CUE in text:
        return format_answer(
            Round.FRAUD, True, stage=Stage.LATE, confidence=script.fraud_confidence, think="可疑"
        )
    if script.normal_confidence is None:
        return format_answer(Round.FRAUD, None, stage=Stage.EARLY, confidence=0.5, think="信息不足")
    return format_answer(
        Round.FRAUD, False, stage=Stage.EARLY, confidence=script.normal_confidence, think="正常"
    )


async def scripted(requests: Sequence[EngineRequest]) -> list[Generation]:
    await asyncio.sleep(0.001)  # an engine takes time: latencies are positive
    return [Generation(answer(r)) for r in requests]


POLICY = DecisionPolicy(alert_threshold=0.5)


@pytest.fixture(scope="module")
def stopped() -> list[CallResult]:
    """The scripted calls replayed as deployed: the policy stops evaluating a call after its first alert."""
    return replay_calls(CALLS, scripted, POLICY, concurrency=3)


@pytest.fixture(scope="module")
def monitored() -> list[CallResult]:
    """The same replay evaluating every point whatever the alerts."""
    return replay_calls(CALLS, scripted, monitoring_policy(POLICY), concurrency=3)


# --- the replay -----------------------------------------------------------------------------------------------


def test_replay_records_verdicts_and_decisions_per_call(stopped: list[CallResult]) -> None:
    assert [r.call_id for r in stopped] == [c.call_id for c in CALLS]  # the input order
    by = {r.call_id.split("/")[1]: r for r in stopped}
    a = by["CALLA"]
    assert a.is_fraud and a.fraud_type == "银行诈骗" and a.first_alert_time == 30.0 and a.duration == 80.0
    # turn 2: scene + is_fraud (one invocation, two requests); turn 3: is_fraud (alert) + fraud type; then stop
    assert [(d.round, d.label, d.audio_time) for d in a.decisions] == [
        ("scene", "咨询客服", 20.0),
        ("is_fraud", False, 20.0),
        ("is_fraud", True, 30.0),
        ("fraud_type", "银行诈骗", 30.0),
    ]
    assert [d.alert for d in a.decisions] == [False, False, True, False]
    assert a.model_calls == 4 and len(a.evaluation_latencies) == 2
    assert all(d.latency_s > 0 for d in a.decisions)
    assert by["CALLD"].is_fraud is False and by["CALLD"].fraud_type is None
    assert by["CALLG"].undecided and by["CALLG"].verdict_label == "unknown"
    assert by["CALLE"].scene == "外卖服务" and by["CALLE"].verdict_label == "normal"
    assert all(r.error is None and r.engine_errors == 0 for r in stopped)


def test_replay_estimates_turn_times_when_the_source_has_none() -> None:
    untimed = CALLS[1].model_copy(
        update={"turns": tuple(t.model_copy(update={"start": None, "end": None}) for t in CALLS[1].turns)}
    )
    [result] = replay_calls([untimed], scripted, POLICY)
    timed = estimate_times(untimed)
    assert result.duration == pytest.approx(timed.turns[-1].end)
    # the cue is in turn 2: the alert comes at that turn's estimated end
    assert result.first_alert_time == pytest.approx(timed.turns[1].end)


def test_replay_batches_across_calls() -> None:
    def batch(requests: list[EngineRequest]) -> list[Generation]:
        return [Generation(answer(r)) for r in requests]

    together = MicroBatcher(batch, max_batch_size=16, wait_ms=30)
    replay_calls(CALLS, together.generate, POLICY, concurrency=len(CALLS))
    # one call's evaluation sends at most 2 requests (scene + is_fraud): more in a batch means several calls
    assert max(together.batches) > 2
    alone = MicroBatcher(batch, max_batch_size=16, wait_ms=30)
    replay_calls(CALLS, alone.generate, POLICY, concurrency=1)
    assert max(alone.batches) <= 2


def test_engine_failures_are_counted_and_the_call_goes_on() -> None:
    failed = {"n": 0}

    async def flaky(requests: Sequence[EngineRequest]) -> list[Generation]:
        if failed["n"] == 0:  # the first invocation fails: the next chunk evaluates again
            failed["n"] += 1
            raise RuntimeError("engine down")
        return await scripted(requests)

    [result] = replay_calls([CALLS[0]], flaky, POLICY)
    assert result.engine_errors == 1 and result.error is None
    assert result.is_fraud and result.first_alert_time == 30.0


def test_an_alert_whose_fraud_type_round_failed_is_kept() -> None:
    async def no_round_three(requests: Sequence[EngineRequest]) -> list[Generation]:
        if any(r.round is Round.FRAUD_TYPE for r in requests):
            raise RuntimeError("round 3 down")
        return await scripted(requests)

    [result] = replay_calls([CALLS[0]], no_round_three, POLICY)
    # the chunk answered 503, but its alert stands: the verdict and the decisions both have it
    assert result.engine_errors == 1 and result.is_fraud and result.fraud_type is None
    assert [d.round for d in result.decisions] == ["scene", "is_fraud", "is_fraud"]
    assert result.decisions[-1].alert and result.first_alert_time == 30.0


def test_replay_through_the_serving_engine_on_a_tiny_model(tiny_text_model: TinyModel) -> None:
    from teleguard.engines.contract import EngineConfig
    from teleguard.evaluate.live import replay_model

    config = EngineConfig(
        kind="transformers", model=str(tiny_text_model.path), device="cpu", max_tokens=8, batch_wait_ms=20
    )
    policy = DecisionPolicy(max_tokens=8)
    results = replay_model(CALLS[:3], config, policy, concurrency=3)
    assert [r.call_id for r in results] == [c.call_id for c in CALLS[:3]]
    for record, r in zip(CALLS[:3], results, strict=True):
        # 8 tokens of an untrained model answer nothing: every turn from the 2nd is evaluated, each time
        # with a scene and an is_fraud request (the scene stays unknown), and no alert is raised
        assert len(r.fraud_decisions) == len(record.turns) - 1
        assert r.model_calls == 2 * len(r.fraud_decisions) and not r.is_fraud
        assert all(d.problems for d in r.decisions) and all(d.latency_s > 0 for d in r.decisions)
    m = live_metrics(results)
    assert m["undecided_calls"] == 3 and m["malformed_rate"] == 1.0 and m["latency_s"]["p50"] > 0


# --- the metrics, by hand ---------------------------------------------------------------------------------------


def test_live_metrics_against_hand_computed_values(stopped: list[CallResult]) -> None:
    m = live_metrics(stopped)
    assert (m["n_calls"], m["n_fraud_calls"], m["n_normal_calls"]) == (7, 4, 3)
    # verdicts: A, B, C fraud (right); D normal (wrong); E normal (right); F fraud (false alarm); G unknown
    assert m["verdict_accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    # macro F1 over fraud, normal and unknown: fraud 0.75; normal P 1/2, R 1/3, F1 0.4; unknown 0
    assert m["macro_f1"] == pytest.approx((0.75 + 0.4 + 0.0) / 3)
    assert m["false_alarm_rate"] == pytest.approx(1 / 3)
    assert m["undecided_calls"] == 1
    # fraud type over A, B, C, D: A and B right, C wrong, D not flagged
    assert m["fraud_type_accuracy"] == pytest.approx(0.5)
    # scene over E, F, G: G's scene is wrong
    assert m["scene_accuracy"] == pytest.approx(2 / 3)
    # first alerts: A 30 s of 80, B 20 s of 100, C 60 s of 60
    assert m["time_to_detection_s"]["mean"] == pytest.approx((30 + 20 + 60) / 3)
    assert m["time_to_detection_s"]["median"] == pytest.approx(30)
    assert m["detection_fraction"]["mean"] == pytest.approx((0.375 + 0.2 + 1.0) / 3)
    assert m["detection_fraction"]["median"] == pytest.approx(0.375)
    assert m["flagged_within_quarter"] == pytest.approx(1 / 4)  # B
    assert m["flagged_within_half"] == pytest.approx(2 / 4)  # A, B
    # decisions: A 4, B 3 (scene, alert, type), C 2+1+1+1+2, D 2+1+1+1, E 2+1+1, F 2+1+2, G 2+1
    assert m["decisions_per_call"] == pytest.approx(31 / 7)
    assert m["model_calls_per_call"] == pytest.approx(31 / 7)  # one request per decision
    assert m["evaluations_per_call"] == pytest.approx((2 + 1 + 5 + 4 + 3 + 3 + 2) / 7)
    assert m["latency_s"]["n"] == 20 and 0 < m["latency_s"]["p50"] <= m["latency_s"]["p99"]
    assert m["malformed_rate"] == 0.0


def test_calibration_bins_and_ece_by_hand(stopped: list[CallResult]) -> None:
    cal = live_metrics(stopped)["calibration"]
    # 20 is_fraud decisions, G's 2 null ones left out. By confidence: 0.3 x3 (D, right), 0.7 x1 (F, wrong),
    # 0.8 x8 (A, C x4, D: wrong; F x2: right), 0.9 x3 (A, B, C: right), 0.95 x3 (E: right)
    assert (cal["n"], cal["left_out"]) == (18, 2)
    bins = {round(b["low"], 1): b for b in cal["bins"] if b["count"]}
    assert {k: b["count"] for k, b in bins.items()} == {0.3: 3, 0.7: 1, 0.8: 8, 0.9: 6}
    assert bins[0.8]["accuracy"] == pytest.approx(2 / 8)
    assert bins[0.9]["mean_confidence"] == pytest.approx((3 * 0.9 + 3 * 0.95) / 6)
    assert bins[0.3]["accuracy"] == 1.0 and bins[0.7]["accuracy"] == 0.0
    expected = (3 * 0.7 + 1 * 0.7 + 8 * abs(0.25 - 0.8) + 6 * abs(1 - 0.925)) / 18
    assert cal["ece"] == pytest.approx(expected)
    # the scripted engine reports no log-probabilities: the stated number is the confidence
    assert live_metrics(stopped)["calibration_stated"]["ece"] == pytest.approx(expected)


def test_reliability_edges() -> None:
    table = reliability([0.0, 0.1, 0.3, 0.99, 1.0], [True, False, True, True, False], bins=10)
    counts = [b["count"] for b in table["bins"]]
    assert counts == [1, 1, 0, 1, 0, 0, 0, 0, 0, 2]  # 0.1 and 0.3 open their bins; 1.0 is in the last
    assert table["bins"][9]["accuracy"] == pytest.approx(0.5)
    assert table["ece"] == pytest.approx((1 * 1.0 + 1 * 0.1 + 1 * 0.7 + 2 * abs(0.5 - 0.995)) / 5)
    assert reliability([], [])["ece"] is None


def test_sweep_of_a_replay_that_stops_after_the_first_alert(stopped: list[CallResult]) -> None:
    points = {p["threshold"]: p for p in threshold_sweep(stopped, [0.0, 0.3, 0.35, 0.7, 0.75, 0.95])}
    # at or below the replay's threshold (0.5) exact: D fires at 0.3, F at 0.7, A/B/C at 0.9
    assert points[0.0]["recall"] == 1.0 and points[0.0]["false_alarm_rate"] == pytest.approx(1 / 3)
    assert points[0.3]["recall"] == 1.0 and points[0.3]["exact"]
    assert points[0.35]["recall"] == pytest.approx(3 / 4) and points[0.35]["exact"]
    assert points[0.35]["flagged_within_half"] == pytest.approx(2 / 4)  # D's first firing is at 30 of 50 s
    # above it: F stopped at a 0.7 alert, so 0.75 cannot say what F would have done later
    assert points[0.7]["exact"] and points[0.7]["false_alarm_rate"] == pytest.approx(1 / 3)
    assert not points[0.75]["exact"] and points[0.75]["inexact_calls"] == 1
    assert points[0.95]["inexact_calls"] == 4 and points[0.95]["recall"] == 0.0


def test_monitoring_replay_gives_the_deployed_figures_and_an_exact_sweep(
    stopped: list[CallResult], monitored: list[CallResult]
) -> None:
    by = {r.call_id: r for r in monitored}
    a = by["scripted/CALLA"]
    assert len(a.fraud_decisions) == 7  # turns 2..8: evaluated on after the alert at turn 3
    deployed = as_deployed(a)
    assert [(d.round, d.audio_time) for d in deployed.decisions] == [
        (d.round, d.audio_time) for d in next(r for r in stopped if r.call_id == a.call_id).decisions
    ]
    m_stop, m_mon = live_metrics(stopped), live_metrics(monitored)
    for key in (
        "verdict_accuracy",
        "macro_f1",
        "false_alarm_rate",
        "fraud_type_accuracy",
        "scene_accuracy",
        "flagged_within_quarter",
        "flagged_within_half",
        "decisions_per_call",
        "model_calls_per_call",
        "evaluations_per_call",
        "undecided_calls",
    ):
        assert m_mon[key] == pytest.approx(m_stop[key]), key
    assert m_mon["time_to_detection_s"]["mean"] == pytest.approx(m_stop["time_to_detection_s"]["mean"])
    sweep = {p["threshold"]: p for p in m_mon["threshold_sweep"]}
    assert all(p["exact"] for p in sweep.values())
    # F's later turns still say fraud at 0.7 only, and A/B/C at 0.9: exact now
    assert sweep[0.75]["false_alarm_rate"] == 0.0 and sweep[0.75]["recall"] == pytest.approx(3 / 4)
    assert sweep[0.95]["recall"] == 0.0
    # the operating point at <= 5 % false alarms: recall 3/4 from 0.75 to 0.9, the highest threshold wins
    assert m_mon["operating_point"]["threshold"] == pytest.approx(0.9)
    loose = pick_threshold(m_mon["threshold_sweep"], max_false_alarm_rate=0.34)
    assert loose is not None and loose["threshold"] == pytest.approx(0.3) and loose["recall"] == 1.0
    assert pick_threshold(m_mon["threshold_sweep"], max_false_alarm_rate=-1.0) is None


def test_results_round_trip_through_jsonl(stopped: list[CallResult], tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    write_results(path, stopped)
    again = read_results(path)
    assert again == stopped
    assert live_metrics(again)["verdict_accuracy"] == pytest.approx(4 / 7)


def test_figures_and_report(stopped: list[CallResult], tmp_path: Path) -> None:
    m = live_metrics(stopped)
    figures = live_figures(m)
    assert figures["live_verdict_accuracy"] == pytest.approx(4 / 7)
    assert figures["live_false_alarm_rate"] == pytest.approx(1 / 3)
    assert figures["live_fraud_type_accuracy"] == pytest.approx(0.5)
    assert figures["live_flagged_within_half"] == pytest.approx(0.5)
    assert all(isinstance(v, float) and math.isfinite(v) for v in figures.values())
    assert set(figures) <= {"live_" + name for name, _ in FIGURES}
    # nothing detected: the timing figures are left out, not written as 0
    none_found = live_figures(live_metrics([r for r in stopped if not r.is_fraud]))
    assert "live_time_to_detection_s_mean" not in none_found and none_found["live_flagged_within_half"] == 0.0

    text = live_markdown({"model": m, "other": m})
    for heading in ("Verdicts by round", "Time to detection", "calibration", "threshold sweep"):
        assert heading in text
    for round_name in ("fraud (is_fraud): accuracy", "fraud type: accuracy", "scene: accuracy"):
        assert f"| {round_name} | 0." in text
    assert "| 0.35 | 0.750 | 0.333 |" in text  # a sweep row: threshold, recall, false alarms
    paths = write_live_report({"model": m}, tmp_path)
    assert json.loads(paths["json"].read_text())["models"]["model"]["n_calls"] == 7
    assert "Verdicts by round" in paths["html"].read_text()


# --- the baseline ---------------------------------------------------------------------------------------------


def test_baseline_points_are_the_detectors_prompts() -> None:
    """The baseline looks where the detector asks, at the text the model's prompt holds (window cut too)."""
    from teleguard.evaluate.baseline import live_points

    policy = DecisionPolicy(max_transcript_chars=25)
    seen: list[tuple[str, str]] = []

    async def recording(requests: Sequence[EngineRequest]) -> list[Generation]:
        seen.extend((r.call_id, user_text(r)) for r in requests if r.round is Round.FRAUD)
        return [Generation(answer(r)) for r in requests]

    results = replay_calls(CALLS, recording, monitoring_policy(policy))
    for record, result in zip(CALLS, results, strict=True):
        live = live_points(record, policy)
        assert [p.audio_time for p in live.points] == [d.audio_time for d in result.fraud_decisions]
        assert all(len(p.text) <= 25 for p in live.points)
        prompts = [text for _, text in seen if record.call_id.split("/")[1] in text]
        assert len(prompts) == len(live.points)
        assert all(p.text in prompt for p, prompt in zip(live.points, prompts, strict=True))


@pytest.fixture(scope="module")
def shared_calls() -> tuple[list[CallRecord], list[CallRecord]]:
    from teleguard.data.ingest import ingest
    from teleguard.data.splits import split_calls

    files = sorted(TRANSCRIPTS_DIR.glob("*_dialogues-*.jsonl"))
    if not files:
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    calls, _ = ingest([files[0], files[-1]], "dialogues")
    split = split_calls(calls)
    return split["train"][:400], split["test"][:150]


def test_baseline_offline_and_live(shared_calls: tuple[list[CallRecord], list[CallRecord]]) -> None:
    from teleguard.evaluate.baseline import offline_figures, run_baseline

    train, test = shared_calls
    assert {c.labels.is_fraud for c in test} == {True, False}
    out = run_baseline(train, test, DecisionPolicy())
    offline, live = out["offline"], out["live"]
    assert offline["fraud"]["n_samples"] == len(test)
    assert offline["fraud"]["accuracy"] >= 0.9
    assert offline["fraud_type"]["accuracy"] >= 0.4  # 8 types from a few hundred calls; chance is 1/8
    assert offline["scene"]["accuracy"] >= 0.5  # 7 scenes; chance is 1/7
    assert live["n_calls"] == len(test)
    assert live["verdict_accuracy"] >= 0.85 and live["false_alarm_rate"] <= 0.15
    assert 0 < live["flagged_within_half"] <= 1 and live["time_to_detection_s"]["n"] > 0
    assert live["model_calls_per_call"] is None  # no model behind it
    assert all(p["exact"] for p in live["threshold_sweep"])  # every point was scored
    figures = offline_figures(offline)
    assert set(figures) == {
        f"baseline_offline_{k}_{m}"
        for k in ("fraud", "fraud_type", "scene")
        for m in ("accuracy", "macro_f1")
    }
    assert out["seconds"]["total"] < 60
    text = live_markdown({"baseline": live}, baseline_offline=offline)
    assert "Baseline offline (whole calls)" in text and "TF-IDF over character 1–3-grams" in text


def test_baseline_verdict_follows_its_first_alert(
    shared_calls: tuple[list[CallRecord], list[CallRecord]],
) -> None:
    from teleguard.evaluate.baseline import score_live, train_baseline

    train, test = shared_calls
    model = train_baseline(train)
    kept = score_live(model, test[:40], DecisionPolicy(), keep_monitoring_after_alert=False)
    every = score_live(model, test[:40], DecisionPolicy(), keep_monitoring_after_alert=True)

    def seen(r: CallResult) -> tuple[object, ...]:
        decisions = [(d.round, d.label, d.confidence, d.audio_time, d.alert) for d in r.decisions]
        return r.is_fraud, r.fraud_type, r.scene, r.first_alert_time, decisions

    for stop, mon in zip(kept, every, strict=True):
        assert seen(as_deployed(mon)) == seen(stop)  # the monitored result cut at its first alert
        if stop.is_fraud:
            alert = next(d for d in stop.decisions if d.alert)
            assert stop.decisions[-1].round == "fraud_type" and stop.decisions[-1].label == stop.fraud_type
            assert stop.first_alert_time == alert.audio_time and alert.confidence >= 0.5
        else:
            assert not any(d.alert for d in stop.decisions)
