"""Table tests for every branch of SAFE-QAQ's reward rules, plus property tests of their ranges."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleguard import rewards
from teleguard.rewards import REWARDS
from teleguard.rewards import log as reward_log


def out(answer: object, think: str = "分析", after: str = "", fence: bool = False) -> str:
    body = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    if fence:
        body = f"```json\n{body}\n```"
    return f"<think>{think}</think>\n<answer>{body}</answer>{after}"


def obj(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"conversation_stage": "complete", "reason": "理由", "confidence": 0.8}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def score(name: str, completion: str, **columns: str) -> float:
    return REWARDS[name]([completion], **{k: [v] for k, v in columns.items()})[0]


def test_registry_has_exactly_the_safe_qaq_names() -> None:
    assert set(REWARDS) == {
        "prompt_format",
        "scene_classification",
        "fraud_classification",
        "fraud_type_classification",
        "adaptive_classification",
        "new_adaptive_classification",
        "stage_classification",
        "think_length_reward_200",
        "think_length_reward_300",
        "think_length_penalty_200",
        "think_length_penalty_300",
        "think_length_penalty_500",
        "teacher_judge",
        "fraud_classifier",
    }
    assert REWARDS["new_adaptive_classification"] is REWARDS["adaptive_classification"]


# ------------------------------------------------------------------------------------------------ format

FORMAT_CASES = [
    ("tags + valid scene object", out(obj(scene="订餐服务")), 1.0),
    ("tags + valid fenced object", out(obj(is_fraud=True), fence=True), 1.0),
    ("null labels are valid", out(obj(fraud_type=None)), 1.0),
    ("is_fraud must be bool or null", out(obj(is_fraud="true")), 0.5),
    ("confidence above 1", out(obj(scene="订餐服务", confidence=1.2)), 0.5),
    ("confidence below 0", out(obj(scene="订餐服务", confidence=-0.1)), 0.5),
    ("confidence as a string", out(obj(scene="订餐服务", confidence="0.9")), 0.5),
    ("boolean confidence counts as a number", out(obj(scene="订餐服务", confidence=True)), 1.0),
    ("missing conversation_stage", out(obj(scene="订餐服务", conversation_stage=...)), 0.5),
    ("non-string conversation_stage", out(obj(scene="订餐服务", conversation_stage=1)), 0.5),
    ("unknown stage string still well-formed", out(obj(scene="订餐服务", conversation_stage="x")), 1.0),
    ("missing reason", out(obj(scene="订餐服务", reason=...)), 0.5),
    ("no round key", out(obj()), 0.5),
    ("answer is not JSON", out("信息不足，请提供更多通话内容"), 0.5),
    (
        "raw newline inside a string is repaired",
        out('{"conversation_stage": "complete", "scene": null, "reason": "a\nb", "confidence": 1}'),
        1.0,
    ),
    ("nested braces fail the strict bare span", out(obj(scene="订餐服务", extra={"k": 1})), 0.5),
    ("nested braces pass inside a fence", out(obj(scene="订餐服务", extra={"k": 1}), fence=True), 1.0),
    ("no think", '<answer>{"scene": "订餐服务"}</answer>', 0.0),
    ("answer before think", "<answer>{}</answer><think>x</think>", 0.0),
    ("truncated answer", '<think>x</think><answer>{"scene": "订', 0.0),
    ("one trailing character costs 0.001", out(obj(scene="订餐服务"), after="x"), 0.999),
    ("two trailing characters cost 0.001", out(obj(scene="订餐服务"), after="xy"), 0.999),
    ("trailing whitespace is free", out(obj(scene="订餐服务"), after=" \n "), 1.0),
    ("ten trailing characters", out(obj(scene="订餐服务"), after="0123456789"), 1.0 - 9 * 0.001),
    ("trailing text after the last </answer> only", out("x", after="</answer>abc"), 0.5 - 0.002),
]


@pytest.mark.parametrize(("case", "completion", "expected"), FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_prompt_format(case: str, completion: str, expected: float) -> None:
    assert score("prompt_format", completion) == pytest.approx(expected, abs=1e-12)


# -------------------------------------------------------------------------------------------- classification

CLASSIFICATION_CASES = [
    # (reward, answer object or raw answer text, gold, stage, expected)
    ("scene_classification", obj(scene="订餐服务"), "订餐服务", "complete", 5.0),
    ("scene_classification", obj(scene="外卖服务"), "订餐服务", "complete", 0.0),
    ("scene_classification", obj(scene="food ordering"), "订餐服务", "complete", -3.0),
    ("scene_classification", obj(scene=3), "订餐服务", "complete", -3.0),
    ("scene_classification", obj(scene=None), "订餐服务", "early_stage", 5.0),
    ("scene_classification", obj(scene=None), "订餐服务", "late_stage", 0.0),
    ("scene_classification", obj(), "订餐服务", "early_stage", 5.0),  # a missing key reads as null
    ("scene_classification", "no json here", "订餐服务", "complete", 0.0),
    ("scene_classification", '{"scene": "订餐服务",}', "订餐服务", "complete", 0.0),  # unparsable
    ("fraud_classification", obj(is_fraud=True), "fraud", "complete", 5.0),
    ("fraud_classification", obj(is_fraud=False), "normal", "complete", 5.0),
    ("fraud_classification", obj(is_fraud=False), "fraud", "complete", 0.0),
    ("fraud_classification", obj(is_fraud="true"), "fraud", "complete", -3.0),
    ("fraud_classification", obj(is_fraud=1), "fraud", "complete", -3.0),
    ("fraud_classification", obj(is_fraud=None), "fraud", "early_stage", 5.0),
    ("fraud_classification", obj(is_fraud=None), "fraud", "complete", 0.0),
    ("fraud_type_classification", obj(fraud_type="银行诈骗"), "银行诈骗", "complete", 5.0),
    ("fraud_type_classification", obj(fraud_type="投资诈骗"), "银行诈骗", "complete", 0.0),
    ("fraud_type_classification", obj(fraud_type="bank fraud"), "银行诈骗", "complete", -3.0),
    ("fraud_type_classification", obj(fraud_type=None), "银行诈骗", "early_stage", 5.0),
    ("adaptive_classification", obj(scene="打车服务"), "打车服务", "complete", 5.0),
    ("adaptive_classification", obj(is_fraud=True), "fraud", "complete", 5.0),
    ("adaptive_classification", obj(fraud_type="绑架诈骗"), "绑架诈骗", "complete", 5.0),
    ("adaptive_classification", obj(is_fraud="yes"), "normal", "complete", -3.0),
    ("adaptive_classification", obj(scene="打车服务"), "unknown-gold", "complete", 0.0),  # scored as a scene
]


@pytest.mark.parametrize(("reward", "answer", "gold", "stage", "expected"), CLASSIFICATION_CASES)
def test_classification(reward: str, answer: object, gold: str, stage: str, expected: float) -> None:
    assert score(reward, out(answer), answers=gold, conversation_stage=stage) == expected


def test_classification_without_answer_tag_is_zero() -> None:
    assert (
        score("fraud_classification", "<think>x</think>", answers="fraud", conversation_stage="complete") == 0
    )


def test_classification_reads_the_widest_bare_object() -> None:
    # Nested braces: the classification rule takes the span from the first '{' to the last '}'.
    completion = out(obj(is_fraud=True, extra={"k": {"j": 1}}))
    assert score("fraud_classification", completion, answers="fraud", conversation_stage="complete") == 5.0


def test_adaptive_scores_each_sample_with_its_own_stage() -> None:
    # SAFE-QAQ handed the whole batch's stages to each group: sample 1 (a fraud-round sample behind a scene
    # sample) was scored with sample 0's stage. Here each sample keeps its own.
    completions = [out(obj(scene="订餐服务")), out(obj(is_fraud=None))]
    values = REWARDS["adaptive_classification"](
        completions, answers=["订餐服务", "fraud"], conversation_stage=["complete", "early_stage"]
    )
    assert values == [5.0, 5.0]
    values = REWARDS["adaptive_classification"](
        completions, answers=["订餐服务", "fraud"], conversation_stage=["early_stage", "complete"]
    )
    assert values == [5.0, 0.0]


# ---------------------------------------------------------------------------------------------------- stage

STAGE_CASES = [
    (obj(scene="订餐服务", conversation_stage="early_stage"), "early_stage", 5.0),
    (obj(scene="订餐服务", conversation_stage="late_stage"), "early_stage", 0.0),
    (obj(scene="订餐服务", conversation_stage="middle"), "early_stage", -3.0),
    (obj(scene="订餐服务", conversation_stage=2), "complete", -3.0),
    (obj(scene="订餐服务", conversation_stage=None), "late_stage", 0.0),
    (obj(scene=None, conversation_stage="complete"), "complete", -3.0),  # complete with every label null
    (obj(is_fraud=None, conversation_stage="complete"), "late_stage", -3.0),  # predicted complete, all null
    (obj(is_fraud=None, conversation_stage="late_stage"), "complete", -3.0),  # gold complete, all null
    (obj(is_fraud=False, conversation_stage="complete"), "complete", 5.0),
    (obj(scene=None, conversation_stage="early_stage"), "early_stage", 5.0),
    ("信息不足", "early_stage", 0.0),
]


@pytest.mark.parametrize(("answer", "stage", "expected"), STAGE_CASES)
def test_stage_classification(answer: object, stage: str, expected: float) -> None:
    assert score("stage_classification", out(answer), conversation_stage=stage) == expected


# ---------------------------------------------------------------------------------------------- think length


def think_of(tokens: int) -> str:
    return out(obj(scene="订餐服务"), think="诈" * tokens)  # one CJK character is one estimated token


@pytest.mark.parametrize(
    ("name", "tokens", "expected"),
    [
        ("think_length_reward_200", 0, 0.0),
        ("think_length_reward_200", 1, 5 * math.log(2) / math.log(201)),
        ("think_length_reward_200", 100, 5 * math.log(101) / math.log(201)),
        ("think_length_reward_200", 200, 5.0),
        ("think_length_reward_200", 201, 5.0),
        ("think_length_reward_300", 150, 5 * math.log(151) / math.log(301)),
        ("think_length_penalty_200", 200, 0.0),
        ("think_length_penalty_200", 201, -5 * math.log(11) / math.log(1000)),
        ("think_length_penalty_200", 1200, -5.0),  # ln1010/ln1000 > 1: capped
        ("think_length_penalty_300", 400, -5 * math.log(110) / math.log(1000)),
        ("think_length_penalty_500", 600, -7 * math.log(110) / math.log(1000)),
        ("think_length_penalty_500", 5000, -7.0),
    ],
)
def test_think_length(name: str, tokens: int, expected: float) -> None:
    assert score(name, think_of(tokens)) == pytest.approx(expected)


def test_think_length_reward_floor() -> None:
    # "~" is a quarter token: 5*ln(1.25)/ln(201) = 0.21 is raised to a tenth of the maximum.
    assert score("think_length_reward_200", out(obj(), think="~")) == 0.5
    assert score("think_length_reward_200", out(obj(), think="")) == 0.0


def test_think_length_needs_a_closed_think() -> None:
    for name in ("think_length_reward_300", "think_length_penalty_200"):
        assert score(name, "<think>" + "诈" * 900) == 0.0


def test_think_length_estimate_mixes_scripts() -> None:
    from teleguard.contract import estimate_think_length

    # 2 CJK + 2 words ("OTP", "123") + 2 punctuation ("，", "?") + (3 spaces + "ab" chars... ) / 4
    text = "银行 OTP，123 ?"
    cjk, words, punct = 2, 2, 2
    other = len(text) - cjk
    assert estimate_think_length(text) == cjk + words + punct + (other - words - punct) / 4


# ----------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    "reward", ["scene_classification", "adaptive_classification", "stage_classification"]
)
def test_missing_column_is_named(reward: str) -> None:
    with pytest.raises(ValueError, match="conversation_stage"):
        REWARDS[reward]([out(obj())], answers=["订餐服务"])


def test_missing_answers_column_is_named() -> None:
    with pytest.raises(ValueError, match="'answers'"):
        REWARDS["fraud_classification"]([out(obj())], conversation_stage=["complete"])


def test_misaligned_column_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        REWARDS["fraud_classification"](
            [out(obj())], answers=["fraud", "normal"], conversation_stage=["complete"]
        )


def test_extra_columns_are_ignored() -> None:
    values = REWARDS["fraud_classification"](
        [out(obj(is_fraud=True))], answers=["fraud"], conversation_stage=["complete"], audios=[["a.wav"]]
    )
    assert values == [5.0]


# ------------------------------------------------------------------------------------------------- logging


def test_reward_log_is_off_by_default_and_appends_when_on(tmp_path, monkeypatch) -> None:
    assert reward_log._log is None
    monkeypatch.setenv("RANK", "3")
    log = rewards.enable_reward_log(tmp_path)
    try:
        assert log is not None
        for _ in range(3):
            REWARDS["fraud_classification"](
                [out(obj(is_fraud=True))], answers=["fraud"], conversation_stage=["complete"]
            )
        lines = (tmp_path / "rewards-rank3.jsonl").read_text("utf-8").splitlines()
        assert len(lines) == 3
        row = json.loads(lines[-1])
        assert row["reward"] == "fraud_classification" and row["value"] == 5.0 and row["answers"] == "fraud"
    finally:
        rewards.enable_reward_log(None)
    assert reward_log._log is None


# ------------------------------------------------------------------------------------------------ properties

RANGES = {
    "prompt_format": (-math.inf, 1.0),
    "scene_classification": (-3.0, 5.0),
    "fraud_classification": (-3.0, 5.0),
    "fraud_type_classification": (-3.0, 5.0),
    "adaptive_classification": (-3.0, 5.0),
    "stage_classification": (-3.0, 5.0),
    "think_length_reward_200": (0.0, 5.0),
    "think_length_reward_300": (0.0, 5.0),
    "think_length_penalty_200": (-5.0, 0.0),
    "think_length_penalty_300": (-5.0, 0.0),
    "think_length_penalty_500": (-7.0, 0.0),
}

fragments = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "```json",
        "```",
        "{",
        "}",
        '"scene"',
        '"is_fraud"',
        '"fraud_type"',
        '"conversation_stage"',
        '"complete"',
        '"early_stage"',
        ":",
        ",",
        "true",
        "null",
        "0.5",
        '"订餐服务"',
        '"银行诈骗"',
        '"reason"',
        '"confidence"',
        "\n",
        "诈骗",
        "abc ",
    ]
)
model_outputs = st.one_of(st.text(max_size=300), st.lists(fragments, max_size=40).map("".join))


@settings(max_examples=300, deadline=None)
@given(
    model_outputs,
    st.sampled_from(["订餐服务", "fraud", "normal", "银行诈骗", "??"]),
    st.sampled_from(["early_stage", "late_stage", "complete"]),
)
def test_rewards_stay_in_range(text: str, gold: str, stage: str) -> None:
    for name, (low, high) in RANGES.items():
        value = REWARDS[name]([text], answers=[gold], conversation_stage=[stage])[0]
        assert low <= value <= high, (name, text, value)
        assert math.isfinite(value)
    # format never goes below the 0.5 it earns when text after </answer> is bounded
    fmt = REWARDS["prompt_format"]([text])[0]
    assert fmt >= 0.5 - len(text) * 0.001 or fmt == 0.0
