"""Evaluation metrics against values worked out by hand, and the report files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from teleguard.contract import format_answer
from teleguard.contract.confidence import label_span
from teleguard.engines import Completion, Prompt, SamplingParams
from teleguard.evaluate import (
    RoundPrediction,
    classification_metrics,
    evaluate_predictions,
    predicted_label,
    write_report,
)
from teleguard.evaluate.metrics import prediction_confidence
from teleguard.evaluate.run import predict, read_predictions, write_predictions

INVEST, PHISH, BANK = "投资诈骗", "钓鱼诈骗", "银行诈骗"  # sorted by code point in this order


def fraud_out(
    label: bool | None, *, stage: str = "complete", confidence: float = 1.0, think: str = "t"
) -> str:
    return format_answer("is_fraud", label, stage=stage, confidence=confidence, think=think)


# ---------------------------------------------------------------------------------- classification_metrics


def test_binary_metrics_with_unknown_prediction() -> None:
    y_true = ["fraud", "fraud", "fraud", "normal", "normal"]
    y_pred = ["fraud", "fraud", "normal", "normal", "unknown"]
    m = classification_metrics(y_true, y_pred)
    # labels = gold ∪ predicted, sorted: "unknown" is a class although never gold
    assert m["confusion_matrix"]["labels"] == ["fraud", "normal", "unknown"]
    assert m["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]
    # fraud: tp 2, predicted 2, support 3 -> P 1, R 2/3, F1 = 2·(2/3)/(5/3) = 0.8
    assert m["per_class"]["fraud"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    # normal: tp 1, predicted 2, support 2 -> P = R = F1 = 0.5
    assert m["per_class"]["normal"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    # unknown: tp 0, predicted 1, support 0 -> all 0 (recall's denominator is 0)
    assert m["per_class"]["unknown"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # accuracy = micro F1 = 3/5
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["micro_f1"] == pytest.approx(0.6)
    # weighted = (0.8·3 + 0.5·2 + 0·0) / 5 = 0.68
    assert m["weighted_f1"] == pytest.approx(0.68)
    # macro = (0.8 + 0.5 + 0) / 3: the unknown class counts, (0.8 + 0.5) / 2 = 0.65 would be wrong
    assert m["macro_f1"] == pytest.approx(1.3 / 3)
    assert m["n_samples"] == 5
    assert m["gold_distribution"] == {"fraud": 3, "normal": 2}
    assert m["pred_distribution"] == {"fraud": 2, "normal": 2, "unknown": 1}


def test_multiclass_metrics_with_a_class_never_predicted() -> None:
    y_true = [INVEST, INVEST, PHISH, PHISH, BANK]
    y_pred = [INVEST, PHISH, PHISH, PHISH, INVEST]
    m = classification_metrics(y_true, y_pred)
    assert m["confusion_matrix"]["labels"] == [INVEST, PHISH, BANK]
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # INVEST: tp 1, predicted 2, support 2 -> 0.5 / 0.5 / 0.5
    assert m["per_class"][INVEST]["f1"] == pytest.approx(0.5)
    # PHISH: tp 2, predicted 3, support 2 -> P 2/3, R 1, F1 = 2·(2/3)/(5/3) = 0.8
    assert m["per_class"][PHISH]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"][PHISH]["f1"] == pytest.approx(0.8)
    # BANK: never predicted -> precision 0 (denominator 0), recall 0, F1 0; support 1
    assert m["per_class"][BANK] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["accuracy"] == pytest.approx(0.6)
    # weighted = (0.5·2 + 0.8·2 + 0·1) / 5 = 0.52; macro = (0.5 + 0.8 + 0) / 3 ≈ 0.4333
    assert m["weighted_f1"] == pytest.approx(0.52)
    assert m["macro_f1"] == pytest.approx(1.3 / 3)


def test_empty_and_mismatched_inputs() -> None:
    m = classification_metrics([], [])
    assert (m["n_samples"], m["accuracy"], m["weighted_f1"], m["macro_f1"]) == (0, 0.0, 0.0, 0.0)
    assert m["confusion_matrix"] == {"labels": [], "matrix": []}
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_metrics(["fraud", "normal"], ["fraud"])


# ------------------------------------------------------------------------------------------ predicted_label


@pytest.mark.parametrize(
    ("task", "output", "expected"),
    [
        ("is_fraud", fraud_out(True), "fraud"),
        ("is_fraud", fraud_out(False), "normal"),
        ("is_fraud", fraud_out(None, stage="early_stage"), "unknown"),
        ("is_fraud", format_answer("is_fraud", "true"), "unknown"),  # a string is not a JSON bool
        ("is_fraud", "I think this call is a scam.", "unknown"),  # no answer at all
        ("scene", format_answer("scene", "打车服务"), "打车服务"),
        ("scene", format_answer("scene", "taxi"), "打车服务"),  # alias
        ("scene", format_answer("scene", "Food Delivery"), "外卖服务"),  # English name, any case
        ("scene", format_answer("scene", "会议服务"), "unknown"),  # not a scene
        ("fraud_type", format_answer("fraud_type", "investment fraud"), INVEST),
        ("fraud_type", format_answer("fraud_type", None), "unknown"),
        ("fraud_type", '<answer>{"fraud_type": "bank scam"}</answer>', BANK),  # malformed but readable
    ],
)
def test_predicted_label(task: str, output: str, expected: str) -> None:
    assert predicted_label(RoundPrediction("c", task, "x", output)) == expected


# ------------------------------------------------------------------------------------- evaluate_predictions


def test_format_stats_and_complete_only_classification() -> None:
    preds = [
        # well-formed, think "诈骗电话": 4 CJK characters -> think length 4
        RoundPrediction("a", "is_fraud", "fraud", fraud_out(True, think="诈骗电话")),
        # no think block: not well-formed, think length 0; the answer still counts
        RoundPrediction("b", "is_fraud", "normal", format_answer("is_fraud", True)),
        RoundPrediction("a", "scene", "打车服务", "garbage"),
    ]
    r = evaluate_predictions(preds)
    assert r["n_outputs"] == 3
    assert r["well_formed_rate"] == pytest.approx(1 / 3)
    assert r["mean_think_length"] == pytest.approx(4 / 3)
    assert r["fraud"]["accuracy"] == pytest.approx(0.5)
    assert (r["fraud"]["well_formed_rate"], r["fraud"]["mean_think_length"]) == pytest.approx((0.5, 2.0))
    assert (r["scene"]["accuracy"], r["scene"]["well_formed_rate"]) == (0.0, 0.0)
    assert r["scene"]["confusion_matrix"]["labels"] == ["unknown", "打车服务"]
    assert "fraud_type" not in r  # no fraud_type rows
    assert "realtime" not in r  # no prefix rows


def realtime_rows() -> list[RoundPrediction]:
    """Two fraud calls and two normal calls, each cut into prefixes.

    F1: alerts at 30 s (late, conf 0.9) -> TTD 30 s / 5 turns at any threshold <= 0.9, early.
    F2: says "normal" early, alerts at 20 s (late, conf 0.4, wrong stage "complete") and at 45 s (complete,
        conf 0.8): TTD 20 s / 4 turns and early at threshold 0; 45 s / 9 turns and not early at 0.5.
    N1: never alerts. N2: alerts at 5 s with conf 0.3: a false alarm at threshold 0, none at 0.5.
    """

    def row(call: str, gold: str, stage: str, seconds: float, turns: int, output: str) -> RoundPrediction:
        return RoundPrediction(
            call, "is_fraud", gold, output, stage=stage, audio_length=seconds, audio_idx=turns
        )

    early, late, done = "early_stage", "late_stage", "complete"
    return [
        row("F1", "fraud", early, 10, 2, fraud_out(None, stage=early)),
        row("F1", "fraud", late, 30, 5, fraud_out(True, stage=late, confidence=0.9)),
        row("F1", "fraud", done, 60, 10, fraud_out(True, stage=done, confidence=0.95)),
        row("F2", "fraud", early, 8, 2, fraud_out(False, stage=early)),
        row("F2", "fraud", late, 20, 4, fraud_out(True, stage=done, confidence=0.4)),
        row("F2", "fraud", done, 45, 9, fraud_out(True, stage=done, confidence=0.8)),
        row("N1", "normal", early, 12, 2, fraud_out(None, stage=early)),
        row("N1", "normal", late, 25, 5, fraud_out(False, stage=late)),
        row("N1", "normal", done, 50, 8, fraud_out(False, stage=done)),
        row("N2", "normal", early, 5, 1, fraud_out(True, stage=early, confidence=0.3)),
        row("N2", "normal", done, 40, 7, fraud_out(False, stage=done)),
        # a scene prefix row: a prefix, so "realtime" appears, but realtime reads only is_fraud rows
        RoundPrediction("N1", "scene", "打车服务", format_answer("scene", None), stage=early),
    ]


def test_realtime_metrics_at_threshold_zero() -> None:
    r = evaluate_predictions(realtime_rows())
    rt = r["realtime"]
    assert (rt["n_rows"], rt["n_fraud_calls"], rt["n_normal_calls"]) == (11, 2, 2)
    # 11 is_fraud rows, all stages right except F2's late row (said "complete") -> 10/11
    assert rt["stage_accuracy"] == pytest.approx(10 / 11)
    # TTD: F1 30 s, F2 20 s -> mean = median = 25 s; turns 5 and 4 -> 4.5
    assert rt["time_to_detection_s"] == {"mean": 25.0, "median": 25.0, "n_detected": 2, "n_fraud_calls": 2}
    assert rt["turns_to_detection"]["mean"] == pytest.approx(4.5)
    assert rt["detection_rate"] == 1.0
    assert rt["early_detection_rate"] == 1.0  # both alerted on a late_stage row
    assert rt["false_alarm_rate"] == 0.5  # N2's early alert
    # early rows: null, False (gold fraud), null, True (gold normal) -> 0/4; late 3/3; complete 4/4
    by_stage = {s: v["accuracy"] for s, v in rt["fraud_accuracy_by_stage"].items()}
    assert by_stage == {"early_stage": 0.0, "late_stage": 1.0, "complete": 1.0}
    # the classification block reads only the 4 complete rows
    assert (r["fraud"]["n_samples"], r["fraud"]["accuracy"]) == (4, 1.0)


def test_realtime_metrics_with_an_alert_threshold() -> None:
    rt = evaluate_predictions(realtime_rows(), alert_threshold=0.5)["realtime"]
    # F2's 0.4 alert no longer counts: TTD F1 30 s, F2 45 s -> 37.5 s; turns 5 and 9 -> 7
    assert rt["time_to_detection_s"]["mean"] == pytest.approx(37.5)
    assert rt["time_to_detection_s"]["median"] == pytest.approx(37.5)
    assert rt["turns_to_detection"]["mean"] == pytest.approx(7.0)
    assert rt["early_detection_rate"] == 0.5  # only F1 before the end
    assert rt["false_alarm_rate"] == 0.0  # N2's 0.3 alert is below the threshold

    none = evaluate_predictions(realtime_rows(), alert_threshold=0.99)["realtime"]
    assert none["time_to_detection_s"] == {"mean": None, "median": None, "n_detected": 0, "n_fraud_calls": 2}
    assert none["detection_rate"] == 0.0


_STATED = re.compile(r'"confidence": [0-9.]+')


def stating(output: str, stated: float) -> str:
    """`output` with its stated confidence replaced by `stated`."""
    return _STATED.sub(f'"confidence": {stated}', output)


def test_realtime_alerts_follow_the_token_confidence() -> None:
    """Every answer states 1.0 (as trained models do); the token confidences are realtime_rows' stated
    numbers, so at 0.5 the alerts are those of realtime_rows at 0.5, not those of "everything is sure"."""
    token_rows = []
    for p in realtime_rows():
        stated = prediction_confidence(p)[0]
        token_rows.append(
            replace(p, output=stating(p.output, 1.0), confidence=stated, confidence_source="tokens")
        )
    rt = evaluate_predictions(token_rows, alert_threshold=0.5)["realtime"]
    assert rt["confidence_source"] == {"tokens": 11, "stated": 0}
    assert rt["time_to_detection_s"]["mean"] == pytest.approx(37.5)  # F2's 0.4 alert does not count
    assert rt["early_detection_rate"] == 0.5
    assert rt["false_alarm_rate"] == 0.0  # N2 states 1.0 but its token confidence is 0.3

    # the same outputs without a measured confidence: the stated 1.0 stands in, and every "true" alerts
    stated_rows = [replace(p, confidence=None, confidence_source=None) for p in token_rows]
    rt = evaluate_predictions(stated_rows, alert_threshold=0.5)["realtime"]
    assert rt["confidence_source"] == {"tokens": 0, "stated": 11}
    assert rt["time_to_detection_s"]["mean"] == pytest.approx(25.0)
    assert rt["false_alarm_rate"] == 0.5

    # the other way round: an answer stating 0.1 whose token confidence is 0.9 alerts
    low = fraud_out(True, stage="early_stage", confidence=0.1)
    rows = [RoundPrediction("F", "is_fraud", "fraud", low, stage="early_stage", audio_length=7, audio_idx=1)]
    assert evaluate_predictions(rows, alert_threshold=0.5)["realtime"]["detection_rate"] == 0.0
    rows = [replace(rows[0], confidence=0.9, confidence_source="tokens")]
    assert evaluate_predictions(rows, alert_threshold=0.5)["realtime"]["time_to_detection_s"]["mean"] == 7.0


def test_a_measured_confidence_without_label_span_counts_as_zero() -> None:
    """Tokens reported but no label span: None, read as 0 as the server does, not the stated 1.0."""
    out = fraud_out(True, stage="early_stage", confidence=1.0)
    measured = RoundPrediction("F", "is_fraud", "fraud", out, stage="early_stage", confidence_source="tokens")
    assert prediction_confidence(measured) == (None, "tokens")
    assert evaluate_predictions([measured], alert_threshold=0.5)["realtime"]["detection_rate"] == 0.0
    assert evaluate_predictions([measured], alert_threshold=0.0)["realtime"]["detection_rate"] == 1.0
    # not measured: the stated number, and one outside [0, 1] is missing (the server's reading)
    assert prediction_confidence(replace(measured, confidence_source="stated")) == (1.0, "stated")
    odd = replace(measured, output=stating(out, 1.5), confidence_source=None)
    assert prediction_confidence(odd) == (None, "stated")
    assert evaluate_predictions([odd], alert_threshold=0.5)["realtime"]["detection_rate"] == 0.0


# ---------------------------------------------------------------------------------------------------- predict


def label_tokens(text: str, task: str, probability: float) -> tuple[tuple[str, float], ...]:
    """`text` as three tokens: before the label literal (logprob 0), the literal, after it (logprob 0)."""
    start, end = label_span(text, task)
    return ((text[:start], 0.0), (text[start:end], math.log(probability)), (text[end:], 0.0))


class CompletionsEngine:
    """Answers each prompt with the answer named in its user message, with tokens of known logprobs."""

    def __init__(self, answers: dict[str, tuple[str, float]]) -> None:
        self.answers = answers
        self.batches: list[int] = []

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        raise AssertionError("predict asks for completions when the engine has them")

    def generate_completions(
        self, prompts: Sequence[Prompt], params: SamplingParams
    ) -> list[list[Completion]]:
        assert params.temperature == 0.0 and params.n == 1
        self.batches.append(len(prompts))
        out = []
        for prompt in prompts:
            call_id = prompt.messages[-1]["content"]
            text, probability = self.answers[call_id]
            out.append([Completion(text, label_tokens(text, "is_fraud", probability))])
        return out


class TextEngine:
    """A plain `generate` engine: texts, no log-probabilities."""

    def __init__(self, answers: dict[str, tuple[str, float]]) -> None:
        self.answers = answers

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        return [[self.answers[p.messages[-1]["content"]][0]] for p in prompts]


def eval_row(call_id: str, gold: str, seconds: float) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "task": "is_fraud",
        "answers": gold,
        "messages": [{"role": "user", "content": call_id}, {"role": "assistant", "content": "x"}],
        "conversation_stage": "early_stage",
        "audio_length": seconds,
        "audio_idx": 1,
    }


def test_predict_records_the_token_confidence(tmp_path: Path) -> None:
    # F states 1.0 but gives "true" 0.3; N states 0.2 but gives "true" 0.9; G states 1.0, gives it 0.8
    answers = {
        "F": (fraud_out(True, stage="early_stage", confidence=1.0), 0.3),
        "N": (fraud_out(True, stage="early_stage", confidence=0.2), 0.9),
        "G": (fraud_out(True, stage="early_stage", confidence=1.0), 0.8),
    }
    rows = [eval_row("F", "fraud", 5.0), eval_row("N", "normal", 6.0), eval_row("G", "fraud", 9.0)]
    engine = CompletionsEngine(answers)
    preds = predict(engine, rows, max_tokens=64, batch_size=2)
    assert engine.batches == [2, 1]
    assert [p.confidence for p in preds] == pytest.approx([0.3, 0.9, 0.8])
    assert {p.confidence_source for p in preds} == {"tokens"}
    assert [p.output for p in preds] == [answers[c][0] for c in "FNG"]
    rt = evaluate_predictions(preds, alert_threshold=0.5)["realtime"]
    assert rt["confidence_source"] == {"tokens": 3, "stated": 0}
    # F's 0.3 does not alert, G's 0.8 does; N's 0.9 is a false alarm although it states 0.2
    assert (rt["detection_rate"], rt["time_to_detection_s"]["mean"], rt["false_alarm_rate"]) == (
        0.5,
        9.0,
        1.0,
    )
    # kept as written: the metrics recomputed from the predictions file are the same
    write_predictions(tmp_path / "p.jsonl", preds)
    assert read_predictions(tmp_path / "p.jsonl") == preds

    # a plain generate engine: no confidence measured, the stated numbers decide
    plain = predict(TextEngine(answers), rows, max_tokens=64, batch_size=2)
    assert [(p.confidence, p.confidence_source) for p in plain] == [(None, "stated")] * 3
    rt = evaluate_predictions(plain, alert_threshold=0.5)["realtime"]
    assert rt["confidence_source"] == {"tokens": 0, "stated": 3}
    # F and G (stated 1.0) alert: TTD (5 + 9) / 2; N states 0.2: no false alarm
    assert (rt["detection_rate"], rt["time_to_detection_s"]["mean"], rt["false_alarm_rate"]) == (
        1.0,
        7.0,
        0.0,
    )
    # predictions written before confidence_source existed still read
    legacy = {k: v for k, v in plain[0].__dict__.items() if k not in ("confidence", "confidence_source")}
    (tmp_path / "old.jsonl").write_text(json.dumps(legacy) + "\n", "utf-8")
    assert read_predictions(tmp_path / "old.jsonl") == [replace(plain[0], confidence_source=None)]


def test_inconsistent_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="stage"):
        evaluate_predictions([RoundPrediction("a", "is_fraud", "fraud", "", stage="middle")])
    rows = [
        RoundPrediction("a", "is_fraud", "fraud", "", stage="early_stage"),
        RoundPrediction("a", "is_fraud", "normal", ""),
    ]
    with pytest.raises(ValueError, match="disagree"):
        evaluate_predictions(rows)


# --------------------------------------------------------------------------------------------------- report


def test_write_report(tmp_path: Path) -> None:
    base = evaluate_predictions(
        [
            RoundPrediction("a", "is_fraud", "fraud", fraud_out(True)),
            RoundPrediction("b", "is_fraud", "normal", fraud_out(True)),
            RoundPrediction("a", "fraud_type", INVEST, format_answer("fraud_type", "phishing", think="t")),
        ]
    )
    results = {"base": base, "grpo": evaluate_predictions(realtime_rows())}
    paths = write_report(results, tmp_path / "out")

    md = paths["markdown"].read_text(encoding="utf-8")
    assert "## Classification" in md and "| base |" in md and "| grpo |" in md
    assert "Real-time detection" in md and "25.0" in md  # grpo's mean time to detection
    # base's fraud confusion matrix: labels fraud, normal; both predicted fraud
    assert "| gold \\ predicted | fraud | normal |" in md
    assert "| fraud | 1 | 0 |" in md and "| normal | 1 | 0 |" in md
    assert f"| gold \\ predicted | {INVEST} | {PHISH} |" in md  # Chinese stays in the tables

    assert json.loads(paths["json"].read_text(encoding="utf-8")) == json.loads(json.dumps(results))
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page and "grpo" in page

    for key in ("fraud_accuracy", "macro_f1", "think_length", "confusion_base_fraud_type"):
        assert paths[key].read_bytes().startswith(b"\x89PNG"), key
        assert f"({paths[key].relative_to(tmp_path / 'out').as_posix()})" in md


def test_write_report_without_plots(tmp_path: Path) -> None:
    paths = write_report({"sft": evaluate_predictions([])}, tmp_path, title="Empty run", plots=False)
    assert set(paths) == {"json", "markdown", "html"}
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# Empty run") and "| sft |" in md and "data:image" not in paths["html"].read_text()
