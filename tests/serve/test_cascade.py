"""The confidence cascade: a small model answers, its unsure answers go to a large one.

Two tiny Qwen3 models: the small one is taught (tests/support/tiny_training.py) to answer the detector's is_fraud
prompt for call A with "false", confidently, and is torn between "false" and "true" for call B (taught both),
so its own probability of the label it writes (the confidence the cascade reads from the answer tokens'
logprobs, teleguard.contract.confidence) is high for A and about one half for B, while both answers state
confidence 1.0; the large one is a random, wider model. The cascade escalates exactly the answers below the
threshold, returns the large model's answers for them and counts what it did; the same happens behind the
real server, where /metrics shows it. Unit tests cover
the escalation rule, the fallback when the large engine fails, the configuration and CLI options, and the
offline evaluation (`teleguard.evaluate.cascade`) on hand-made predictions with hand-computed numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from teleguard.contract import Round, format_answer
from teleguard.contract.confidence import label_probability, label_span
from teleguard.engines.cascade import CascadeEngine, CascadeGeneration, answer_confidence, escalation_reason
from teleguard.engines.contract import CascadeConfig, EngineConfig, EngineRequest, Generation
from teleguard.engines.factory import build_engine
from teleguard.engines.swift import SwiftServingEngine
from teleguard.evaluate.cascade import (
    cascade_markdown,
    evaluate_cascade,
    prediction_escalation,
    write_cascade_report,
)
from teleguard.evaluate.metrics import RoundPrediction
from teleguard.serve.detector import Detector, DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.tiny_models import build_tiny_model
from tests.support.detector import running
from tests.support.tiny_training import teach_answers

THRESHOLD = 0.5
MODEL_THRESHOLD = 0.7  # the tiny-model tests': between the torn answer's ~0.5 and the sure one's ~0.96
# One is_fraud evaluation per finished turn, no scene round: one request per chunk.
POLICY = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never", max_tokens=96)
CALLS = {
    "call-a": "您好，我是快递员，您的包裹已经放在门口了，请注意查收。",
    "call-b": "我是公安局的，你的银行卡涉嫌洗钱，马上把钱转到安全账户。",
}


def answer(is_fraud: bool | None, confidence: float, round_: Round = Round.FRAUD) -> str:
    return format_answer(round_, is_fraud, stage="late_stage", reason="r", confidence=confidence, think="t")


def segment(call_id: str) -> list[dict[str, Any]]:
    return [{"speaker": "left", "text": CALLS[call_id], "start": 0.0, "end": 2.0}]


def counters(metrics: DetectorMetrics) -> dict[tuple[str, str], float]:
    """The cascade counters in the registry's text exposition: (name, label value) -> value."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name.startswith("teleguard_cascade_") and sample.name.endswith("_total"):
                out[(sample.name, next(iter(sample.labels.values())))] = sample.value
    return out


# ------------------------------------------------------------------------------------------- the two models


@dataclass(frozen=True)
class Models:
    small: Path
    large: Path
    prompts: dict[str, list[dict[str, str]]]  # call id -> the detector's is_fraud prompt for its first turn


def detector_prompts() -> dict[str, list[dict[str, str]]]:
    """The is_fraud prompt the detector sends for each call's first turn (recorded at the engine boundary)."""
    seen: list[EngineRequest] = []

    async def record(requests: Sequence[EngineRequest]) -> list[str]:
        seen.extend(requests)
        return [answer(False, 0.9)] * len(requests)

    async def main() -> None:
        detector = Detector(record, policy=POLICY, metrics=DetectorMetrics(CollectorRegistry()))
        for call_id in CALLS:
            await detector.open({"call_id": call_id})
            await detector.chunk({"call_id": call_id, "seq": 0, "segments": segment(call_id)})

    asyncio.run(main())
    assert [(r.call_id, r.round) for r in seen] == [(c, Round.FRAUD) for c in CALLS]
    return {r.call_id: r.messages for r in seen}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("cascade-models")
    small = build_tiny_model(root / "small", "qwen3", hidden_size=64, seed=0).path
    large = build_tiny_model(root / "large", "qwen3", hidden_size=128, seed=1).path
    prompts = detector_prompts()
    examples = [(prompts["call-a"], answer(False, 1.0))]
    examples += [(prompts["call-b"], answer(False, 1.0)), (prompts["call-b"], answer(True, 1.0))]
    teach_answers(small, examples, margin=4.0)
    return Models(small, large, prompts)


def small_config(models: Models) -> EngineConfig:
    return EngineConfig(kind="transformers", model=str(models.small), device="cpu", timeout_s=120)


def large_config(models: Models) -> EngineConfig:
    # a random model answers noise: a few tokens are enough to tell its answers apart
    return EngineConfig(
        kind="transformers", model=str(models.large), device="cpu", max_tokens=8, timeout_s=60
    )


def test_cascade_escalates_exactly_the_low_confidence_answers(models: Models) -> None:
    requests = [
        EngineRequest(f"{call}-{i}", Round.FRAUD, models.prompts[call], (), POLICY.max_tokens)
        for i in range(2)
        for call in CALLS
    ]
    metrics = DetectorMetrics(CollectorRegistry())

    async def main() -> tuple[list[Generation], list[CascadeGeneration], list[Generation], list[int]]:
        small = SwiftServingEngine(small_config(models))
        large = SwiftServingEngine(large_config(models))
        cascade = CascadeEngine(small, large, threshold=MODEL_THRESHOLD, large_timeout_s=60, metrics=metrics)
        try:
            alone = await small.generate(requests)
            answered = await cascade.generate(requests)
            escalated = [i for i, g in enumerate(answered) if g.escalated]
            large_alone = await large.generate([requests[i] for i in escalated])
            return alone, answered, large_alone, escalated
        finally:
            await cascade.aclose()

    alone, answered, large_alone, escalated = asyncio.run(main())
    assert all(answer_confidence(g.text, Round.FRAUD) == 1.0 for g in alone)  # what every answer states
    confidences = [answer_confidence(g.text, Round.FRAUD, g.logprobs) for g in alone]
    # the small model learned its answers: sure of call A, torn on call B
    assert [c is not None and c > 0.9 for c in confidences] == [True, False, True, False]
    assert all(c is not None and 0.3 < c < 0.6 for c in confidences[1::2])
    unsure = {i for i, c in enumerate(confidences) if c is None or c < MODEL_THRESHOLD}
    assert unsure == {1, 3} and set(escalated) == unsure
    for i, g in enumerate(answered):
        assert g.small_confidence == confidences[i]
        if i in unsure:
            assert g.answered_by == "large" and g.escalation == "low_confidence"
            assert g.small_text == alone[i].text and g.escalation_error is None
        else:
            assert g.answered_by == "small" and g.escalation is None and g.text == alone[i].text
    # the escalated answers are the large model's (asked alone with the same requests)
    assert [answered[i].text for i in escalated] == [g.text for g in large_alone]
    assert all(answered[i].text != alone[i].text for i in escalated)
    for i, g in zip(escalated, large_alone, strict=True):  # the answer's cost: both models' tokens
        assert answered[i].tokens == (alone[i].tokens or 0) + (g.tokens or 0)
    assert counters(metrics) == {
        ("teleguard_cascade_escalations_total", "low_confidence"): len(unsure),
        ("teleguard_cascade_escalations_total", "no_confidence"): 0,
        ("teleguard_cascade_escalations_total", "unparsable"): 0,
        ("teleguard_cascade_decisions_total", "small"): len(requests) - len(unsure),
        ("teleguard_cascade_decisions_total", "large"): len(unsure),
        ("teleguard_cascade_escalation_failures_total", "timeout"): 0,
        ("teleguard_cascade_escalation_failures_total", "error"): 0,
    }


def test_an_escalation_shows_in_the_servers_metrics(models: Models) -> None:
    from teleguard.serve.server import ServeConfig, build_server

    metrics = DetectorMetrics(CollectorRegistry())
    config = ServeConfig(
        port=0,
        engine=small_config(models).model_copy(
            update={"cascade": CascadeConfig(large=large_config(models), threshold=MODEL_THRESHOLD)}
        ),
        policy=POLICY,
        detector=DetectorConfig(engine_timeout_s=120),
    )
    server = build_server(config, engine_factory=lambda c: build_engine(c, metrics=metrics), metrics=metrics)
    decisions: dict[str, dict[str, Any]] = {}
    with running(server), httpx.Client(base_url=server.url, timeout=120) as http:
        assert type(server.model.detector.engine).__name__ == "CascadeEngine"  # type: ignore[union-attr]
        for call_id in CALLS:
            assert http.post("/v1/calls", json={"call_id": call_id}).status_code == 201
            chunk = http.post(f"/v1/calls/{call_id}/chunks", json={"seq": 0, "segments": segment(call_id)})
            assert chunk.status_code == 200, chunk.text
            [decisions[call_id]] = chunk.json()["decisions"]
            assert http.post(f"/v1/calls/{call_id}/close").status_code == 200
        scraped = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for s in family.samples
        }
    # call A's confident answer was the small model's; call B's unsure one went to the (random) large model,
    # whose 8 random tokens are no answer
    call_a, call_b = decisions["call-a"], decisions["call-b"]
    assert call_a["is_fraud"] is False and call_a["confidence"] > MODEL_THRESHOLD
    assert (call_a["stated_confidence"], call_a["confidence_source"]) == (1.0, "tokens")
    assert call_b["is_fraud"] is None and call_b["confidence"] is None
    assert scraped[("teleguard_cascade_escalations_total", (("reason", "low_confidence"),))] == 1
    assert scraped[("teleguard_cascade_decisions_total", (("answered_by", "small"),))] == 1
    assert scraped[("teleguard_cascade_decisions_total", (("answered_by", "large"),))] == 1
    assert scraped[("teleguard_cascade_escalation_failures_total", (("kind", "error"),))] == 0
    assert scraped[("teleguard_model_calls_total", ())] == 2  # one engine invocation per evaluation


# ------------------------------------------------------------------------------------- the cascade, units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (answer(True, 0.9), None),
        (answer(True, THRESHOLD), None),  # at the threshold is confident
        (answer(True, 0.49), "low_confidence"),
        (answer(None, 0.1), "low_confidence"),
        (answer(True, 0.9).replace('"confidence": 0.9', '"confidence": "high"'), "no_confidence"),
        (answer(True, 0.9).replace('"confidence": 0.9', '"confidence": 1.5'), "no_confidence"),
        ('<answer>{"is_fraud": true}</answer>', "no_confidence"),
        ("<think>t</think><answer>I think it is fraud</answer>", "unparsable"),
        ("<think>t</think><answer>{broken", "unparsable"),
        ("", "unparsable"),
    ],
)
def test_escalation_rule(text: str, expected: str | None) -> None:
    assert escalation_reason(text, Round.FRAUD, THRESHOLD) == expected


class Scripted:
    """Answers each request with the text given for its call id; can fail or stall."""

    def __init__(self, texts: dict[str, str], *, fail: bool = False, stall: float = 0.0) -> None:
        self.texts, self.fail, self.stall = texts, fail, stall
        self.asked: list[list[str]] = []

    async def __call__(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        self.asked.append([r.call_id for r in requests])
        if self.fail:
            raise RuntimeError("the large model is down")
        await asyncio.sleep(self.stall)
        return [Generation(self.texts[r.call_id], 5) for r in requests]


SMALL_TEXTS = {
    "sure": answer(False, 0.95),
    "unsure": answer(True, 0.3),
    "silent": '<think>t</think><answer>{"conversation_stage": "late_stage", "is_fraud": true}</answer>',
    "broken": "<think>t</think>",
}


def ask(cascade: CascadeEngine) -> list[CascadeGeneration]:
    requests = [EngineRequest(c, Round.FRAUD, [{"role": "user", "content": c}]) for c in SMALL_TEXTS]
    return asyncio.run(cascade.generate(requests))


def test_only_unsure_answers_go_to_the_large_engine_with_their_reasons() -> None:
    metrics = DetectorMetrics(CollectorRegistry())
    large = Scripted({c: answer(True, 0.99) for c in SMALL_TEXTS})
    answers = ask(CascadeEngine(Scripted(SMALL_TEXTS), large, threshold=0.7, metrics=metrics))
    assert large.asked == [["unsure", "silent", "broken"]]  # one invocation, the escalated requests only
    assert [(a.answered_by, a.escalation) for a in answers] == [
        ("small", None),
        ("large", "low_confidence"),
        ("large", "no_confidence"),
        ("large", "unparsable"),
    ]
    assert answers[0].text == SMALL_TEXTS["sure"] and answers[0].tokens == 5
    assert all(a.text == answer(True, 0.99) and a.tokens == 10 for a in answers[1:])
    assert isinstance(answers[0], Generation)  # the policy and the detector take them as they are
    got = counters(metrics)
    assert got[("teleguard_cascade_escalations_total", "low_confidence")] == 1
    assert got[("teleguard_cascade_escalations_total", "no_confidence")] == 1
    assert got[("teleguard_cascade_escalations_total", "unparsable")] == 1
    assert got[("teleguard_cascade_decisions_total", "large")] == 3


@pytest.mark.parametrize(
    ("large", "kind"), [(Scripted({}, fail=True), "error"), (Scripted({}, stall=5), "timeout")]
)
def test_a_failed_escalation_falls_back_to_the_small_answer(large: Scripted, kind: str) -> None:
    metrics = DetectorMetrics(CollectorRegistry())
    cascade = CascadeEngine(Scripted(SMALL_TEXTS), large, threshold=0.7, large_timeout_s=0.1, metrics=metrics)
    answers = ask(cascade)
    assert [a.text for a in answers] == list(SMALL_TEXTS.values())
    assert all(a.answered_by == "small" for a in answers)
    assert [a.escalated for a in answers] == [False, True, True, True]
    assert all(a.escalation_error and a.escalation_error.startswith(kind) for a in answers[1:])
    got = counters(metrics)
    assert got[("teleguard_cascade_escalation_failures_total", kind)] == 3  # one per escalated request
    assert got[("teleguard_cascade_decisions_total", "small")] == 4
    assert got[("teleguard_cascade_escalations_total", "low_confidence")] == 1


def test_a_failing_small_engine_fails_the_invocation() -> None:
    from teleguard.engines.contract import EngineError

    cascade = CascadeEngine(Scripted({}, fail=True), Scripted(SMALL_TEXTS), threshold=0.7)
    with pytest.raises(RuntimeError, match="down"):
        ask(cascade)

    async def wrong_count(requests: Sequence[EngineRequest]) -> list[str]:
        return []

    with pytest.raises(EngineError):
        ask(CascadeEngine(wrong_count, Scripted(SMALL_TEXTS), threshold=0.7))


def test_cascade_configuration_and_command_line(tmp_path: Path) -> None:
    from teleguard.serve.cli import ServeConfigError, cascade_overrides, load_serve_config

    remote = {"kind": "remote", "url": "http://big:8000/v1", "model": "big"}
    config = EngineConfig.model_validate({"model": "/m", "timeout_s": 10, "cascade": {"large": remote}})
    assert config.cascade is not None
    assert config.cascade.threshold == 0.7 and config.cascade.large.timeout_s == 5  # half the invocation's
    with pytest.raises(ValueError, match="must be shorter than timeout_s"):
        EngineConfig.model_validate({"timeout_s": 10, "cascade": {"large": {**remote, "timeout_s": 10}}})
    with pytest.raises(ValueError, match="do not nest"):
        EngineConfig.model_validate({"cascade": {"large": {**remote, "cascade": {"large": remote}}}})
    with pytest.raises(ValueError, match="needs 'model'"):
        EngineConfig.model_validate({"cascade": {"large": {"kind": "transformers"}}})
    with pytest.raises(ValueError, match="threshold"):
        EngineConfig.model_validate({"cascade": {"large": remote, "threshold": 1.5}})

    file = tmp_path / "serve.yaml"
    file.write_text(
        "engine: {kind: transformers, cascade: {large: {kind: remote, url: 'http://x/v1', model: m}}}\n"
    )
    served = load_serve_config(
        file,
        {
            "engine.timeout_s": 8.0,
            **cascade_overrides(url=None, model=None, model_dir=None, threshold=0.6, timeout=3.0),
        },
    )
    assert served.engine.cascade.threshold == 0.6 and served.engine.cascade.large.timeout_s == 3.0
    local = load_serve_config(
        None,
        cascade_overrides(
            url=None, model=None, model_dir="/big", threshold=None, timeout=None, engine="vllm", device="cuda"
        ),
    )
    large = local.engine.cascade.large
    assert (large.kind, large.model, large.device, large.timeout_s) == ("vllm", "/big", "cuda", 15.0)
    remote_cli = cascade_overrides(
        url="http://big/v1", model="big", model_dir=None, threshold=0.8, timeout=None
    )
    assert load_serve_config(None, remote_cli).engine.cascade.large.url == "http://big/v1"
    for bad in (
        {"url": "http://big/v1", "model": "big", "model_dir": "/big"},
        {"url": None, "model": "big", "model_dir": None},
        {"url": "http://big/v1", "model": None, "model_dir": None},
    ):
        with pytest.raises(ServeConfigError):
            cascade_overrides(threshold=None, timeout=None, **bad)


def test_serve_command_has_the_cascade_options() -> None:
    from typer.testing import CliRunner

    from teleguard.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--escalate-url",
        "--escalate-model",
        "--escalate-model-dir",
        "--escalation-threshold",
        "--escalation-timeout",
    ):
        assert option in result.output
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        bad = CliRunner().invoke(app, ["serve", "--escalate-model", "big"])
        assert bad.exit_code == 2
        # the command set up the server's log while the runner's stderr was in place, and the runner has closed
        # it: a later server in this process still logs, to the stderr of the moment
        later = io.StringIO()
        with contextlib.redirect_stderr(later):
            logging.getLogger("teleguard.after").warning("still logging")
        assert "still logging" in later.getvalue() and "Logging error" not in later.getvalue()
    finally:  # the servers of later tests in this worker log as pytest configured
        root.handlers[:] = handlers
        root.setLevel(level)


# -------------------------------------------------------------------------------- offline evaluation, units


def fraud_row(call_id: str, gold: str, output: str, **fields: Any) -> RoundPrediction:
    return RoundPrediction(call_id=call_id, task="is_fraud", gold=gold, output=output, **fields)


NO_CONFIDENCE = (
    '<think>t</think><answer>{"conversation_stage": "complete", "is_fraud": true, "reason": ""}</answer>'
)


def hand_made() -> tuple[list[RoundPrediction], list[RoundPrediction]]:
    scene_small = answer("咨询客服", 0.8, Round.SCENE)
    scene_large = answer("订餐服务", 0.9, Round.SCENE)
    small = [
        fraud_row("c0", "fraud", answer(True, 0.9)),  # confident, right
        fraud_row("c1", "normal", answer(True, 0.4)),  # low confidence: escalated
        fraud_row("c2", "fraud", answer(False, 0.95)),  # confident, wrong
        fraud_row("c3", "normal", "no idea"),  # unparsable: escalated
        fraud_row("c4", "fraud", NO_CONFIDENCE),  # no confidence: escalated (its label is right)
        RoundPrediction("c0", "scene", "咨询客服", scene_small),  # confident, right
    ]
    large = [
        RoundPrediction("c0", "scene", "咨询客服", scene_large),  # wrong; order does not matter
        fraud_row("c9", "fraud", answer(True, 0.9)),  # the small model never answered this row
        fraud_row("c0", "fraud", answer(False, 0.6)),  # wrong
        fraud_row("c1", "normal", answer(False, 0.8)),  # right
        fraud_row("c2", "fraud", answer(False, 0.7)),  # wrong
        fraud_row("c3", "normal", answer(False, 0.9)),  # right
        fraud_row("c4", "fraud", answer(True, 0.9)),  # right
    ]
    return small, large


def test_evaluate_cascade_on_hand_made_predictions() -> None:
    small, large = hand_made()
    result = evaluate_cascade(small, large, threshold=0.5)
    assert result["n_rows"] == 6 and result["n_unmatched"] == {"small": 0, "large": 1}
    assert result["n_escalated"] == 3 and result["escalation_rate"] == pytest.approx(0.5)
    assert result["escalation_reasons"] == {"low_confidence": 1, "no_confidence": 1, "unparsable": 1}
    fraud = result["by_task"]["fraud"]
    assert (fraud["n_rows"], fraud["n_scored"], fraud["n_escalated"]) == (5, 5, 3)
    assert fraud["escalation_rate"] == pytest.approx(0.6)
    # small: c0, c4 right (2/5); large: c1, c3, c4 (3/5); cascade: c0 (small), c1, c3, c4 (large) = 4/5
    assert fraud["accuracy"] == pytest.approx({"small": 0.4, "large": 0.6, "cascade": 0.8})
    scene = result["by_task"]["scene"]
    assert scene["n_escalated"] == 0
    assert scene["accuracy"] == {"small": 1.0, "large": 0.0, "cascade": 1.0}
    assert result["cascade"]["fraud"]["accuracy"] == pytest.approx(0.8)
    assert [(e["row"], e["call_id"], e["reason"]) for e in result["escalated"]] == [
        (1, "c1", "low_confidence"),
        (3, "c3", "unparsable"),
        (4, "c4", "no_confidence"),
    ]
    first = result["escalated"][0]
    assert (first["small_confidence"], first["small_label"], first["large_label"], first["gold"]) == (
        0.4,
        "fraud",
        "normal",
        "normal",
    )
    assert result["escalated"][1]["small_label"] == "unknown"
    assert result["escalated_call_ids"] == ["c1", "c3", "c4"]
    # threshold 0: only answers without a usable confidence escalate; 1: all but confidence-1.0 answers
    assert evaluate_cascade(small, large, threshold=0.0)["n_escalated"] == 2
    assert evaluate_cascade(small, large, threshold=1.0)["n_escalated"] == 6


def test_evaluate_cascade_pairs_rows_and_refuses_disagreeing_gold() -> None:
    small = [fraud_row("c1", "fraud", answer(True, 0.2), stage="early_stage", audio_idx=2)] * 2
    large = [fraud_row("c1", "fraud", answer(True, 0.9), stage="early_stage", audio_idx=2)]
    result = evaluate_cascade(small, large, threshold=0.5)
    assert result["n_rows"] == 1 and result["n_unmatched"] == {"small": 1, "large": 0}
    assert result["by_task"]["fraud"]["n_scored"] == 0  # prefixes are judged in "realtime"
    assert result["cascade"]["realtime"]["detection_rate"] == 1.0
    with pytest.raises(ValueError, match="gold"):
        evaluate_cascade([fraud_row("c1", "fraud", "x")], [fraud_row("c1", "normal", "x")], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        evaluate_cascade(small, large, threshold=2.0)


def test_write_cascade_report(tmp_path: Path) -> None:
    result = evaluate_cascade(*hand_made(), threshold=0.5)
    paths = write_cascade_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text("utf-8")) == json.loads(json.dumps(result))
    markdown = paths["markdown"].read_text("utf-8")
    assert "# Confidence cascade (threshold 0.50)" in markdown
    assert "Escalated to the large model: 3 (50.0%)" in markdown
    assert "| fraud | 5 | 5 | 3 (60.0%) | 0.400 | 0.600 | 0.800 |" in markdown
    assert (
        "| 1 | c1 | is_fraud | complete | 0 | low_confidence | 0.40 | fraud | normal | normal |" in markdown
    )


def token_row(
    call_id: str, gold: str, stated: float, token: float | None, label: bool = True
) -> RoundPrediction:
    """An is_fraud row stating `stated` whose measured token confidence is `token` (None: no label span)."""
    return fraud_row(call_id, gold, answer(label, stated), confidence=token, confidence_source="tokens")


def test_evaluate_cascade_escalates_on_the_token_confidence() -> None:
    """The stated number and the token probability disagree; the escalation follows the token one."""
    small = [
        token_row("c0", "fraud", 0.9, 0.2),  # states 0.9, token 0.2: escalated (stated alone would not)
        token_row("c1", "normal", 0.4, 0.8, label=False),  # states 0.4, token 0.8: kept (stated would go)
        token_row("c2", "fraud", 1.0, None),  # tokens but no label span: no_confidence, not the stated 1.0
        fraud_row("c3", "normal", "no idea", confidence_source="tokens"),  # unparsable
        fraud_row("c4", "fraud", answer(True, 0.3)),  # no logprobs: the stated 0.3 decides
    ]
    large = [fraud_row(c, g, answer(g == "fraud", 0.9)) for c, g in [("c0", "fraud"), ("c1", "normal")]]
    large += [fraud_row(c, g, answer(g == "fraud", 0.9)) for c, g in [("c2", "fraud"), ("c3", "normal")]]
    large += [fraud_row("c4", "fraud", answer(True, 0.9))]
    result = evaluate_cascade(small, large, threshold=0.5)
    assert result["confidence_source"] == {"tokens": 4, "stated": 1}
    assert [
        (e["call_id"], e["reason"], e["small_confidence"], e["confidence_source"])
        for e in result["escalated"]
    ] == [
        ("c0", "low_confidence", 0.2, "tokens"),
        ("c2", "no_confidence", None, "tokens"),
        ("c3", "unparsable", None, "tokens"),
        ("c4", "low_confidence", 0.3, "stated"),
    ]
    assert result["escalation_reasons"] == {"low_confidence": 2, "no_confidence": 1, "unparsable": 1}
    # the cascade's rows: c1 is the small model's (token confidence kept), the others the large model's
    # (its outputs, stated only): 1 token row and 4 stated ones
    assert result["cascade"]["confidence_source"] == {"tokens": 1, "stated": 4}
    # small: c0, c1, c2, c4 right (4/5); large all right; cascade: c1 (small) + 4 large = 5/5
    assert result["by_task"]["fraud"]["accuracy"] == pytest.approx(
        {"small": 0.8, "large": 1.0, "cascade": 1.0}
    )
    # the same outputs read on the stated numbers only: c1 (0.4) escalates, c0 (0.9) and c2 (1.0) stay
    stated = [replace(p, confidence=None, confidence_source=None) for p in small]
    assert [e["call_id"] for e in evaluate_cascade(stated, large, 0.5)["escalated"]] == ["c1", "c3", "c4"]
    markdown = cascade_markdown(result)
    assert "token probability of the label for 4 rows, the number it states for 1" in markdown


def test_offline_escalation_is_the_servers_on_the_same_tokens() -> None:
    """`prediction_escalation` on the recorded token confidence is `escalation_reason` given the tokens."""
    text = answer(True, 1.0)
    start, end = label_span(text, Round.FRAUD)
    for probability in (0.1, 0.5, 0.69, 0.7, 0.95):
        tokens = [(text[:start], -0.01), (text[start:end], math.log(probability)), (text[end:], -0.2)]
        measured = label_probability(text, tokens, Round.FRAUD).probability
        p = fraud_row("c", "fraud", text, confidence=measured, confidence_source="tokens")
        for threshold in (0.0, 0.5, 0.7, 1.0):
            reason, confidence, source = prediction_escalation(p, threshold)
            assert (confidence, source) == (measured, "tokens")
            assert reason == escalation_reason(text, Round.FRAUD, threshold, logprobs=tokens)
    # tokens that do not spell the answer: no label span on either side
    wrong = [("<answer>{}</answer>", -0.1)]
    assert label_probability(text, wrong, Round.FRAUD).probability is None
    p = fraud_row("c", "fraud", text, confidence=None, confidence_source="tokens")
    assert prediction_escalation(p, 0.5)[0] == escalation_reason(text, Round.FRAUD, 0.5, logprobs=wrong)
