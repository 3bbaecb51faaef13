"""The task contract: labels, prompts and the answer parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleguard.contract import (
    FRAUD_TYPE_NAMES,
    SCENE_NAMES,
    STAGES,
    Mode,
    PromptFileError,
    Round,
    builtin_prompts,
    english_name,
    load_prompts,
    normalize_fraud_type,
    normalize_scene,
    parse_output,
    round_of_answer,
)

# ----------------------------------------------------------------------------------------------------- labels


def test_label_sets_match_the_dataset() -> None:
    assert (
        len(SCENE_NAMES) == 7
        and len(FRAUD_TYPE_NAMES) == 8
        and STAGES == ("early_stage", "late_stage", "complete")
    )
    assert "订餐服务" in SCENE_NAMES and "邮件诈骗" in FRAUD_TYPE_NAMES


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("Food Ordering", "订餐服务"),
        ("ride-hailing", "打车服务"),
        (" takeaway ", "外卖服务"),
        ("订餐服务", "订餐服务"),
    ],
)
def test_scene_aliases(spelling: str, canonical: str) -> None:
    assert normalize_scene(spelling) == canonical


def test_fraud_type_aliases_and_english() -> None:
    assert normalize_fraud_type("Phishing") == "钓鱼诈骗"
    assert normalize_fraud_type("parcel fraud") == "邮件诈骗"
    assert normalize_fraud_type("订餐服务") is None
    assert english_name("银行诈骗") == "bank fraud"


def test_round_of_answer() -> None:
    assert round_of_answer("外卖服务") is Round.SCENE
    assert round_of_answer("normal") is Round.FRAUD
    assert round_of_answer("彩票诈骗") is Round.FRAUD_TYPE
    assert round_of_answer("unknown") is None


# ---------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("round_", list(Round))
def test_every_prompt_renders(language: str, mode: Mode, round_: Round) -> None:
    prompts = builtin_prompts(language)  # type: ignore[arg-type]
    text = prompts.user_prompt(round_, mode, transcript="甲：你好\n乙：喂")
    assert "$" not in text  # every placeholder filled
    assert "甲：你好" in text
    assert f'"{round_.value}"' in text
    assert ("<think>" in text) == (mode is not Mode.DIRECT)
    if mode is Mode.REALTIME:
        assert "early_stage" in text and "null" in text
    if round_ is Round.SCENE:
        assert all(scene in text for scene in SCENE_NAMES)
    if round_ is Round.FRAUD_TYPE:
        assert all(t in text for t in FRAUD_TYPE_NAMES)


def test_audio_prompt_and_follow_up_rounds() -> None:
    prompts = builtin_prompts("zh")
    first = prompts.user_prompt(Round.SCENE, audio=True)
    assert first.startswith("<audio>")
    follow = prompts.user_prompt(Round.FRAUD, with_call=False)
    assert "<audio>" not in follow and "文字记录" not in follow
    assert follow.startswith(prompts.follow_up)  # later rounds build on the earlier ones
    assert prompts.follow_up not in prompts.user_prompt(Round.FRAUD, transcript="x")  # a first round does not
    with pytest.raises(ValueError, match="needs the call"):
        prompts.user_prompt(Round.SCENE)


def test_user_prompt_file_overrides_sections(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("language: en\nquestions:\n  is_fraud: Is this a scam call? $transcript\n", "utf-8")
    prompts = load_prompts(path)
    assert prompts.questions.is_fraud.startswith("Is this a scam call?")
    assert prompts.system == builtin_prompts("en").system  # the rest comes from the built-in English set
    assert "Is this a scam call? CALL" in prompts.user_prompt(Round.FRAUD, transcript="CALL")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("language: fr\n", "field 'language'"),
        ("questions:\n  is_fraud: 3\n", "field 'questions.is_fraud'"),
        ("modes:\n  offline: x\n  turbo: y\n", "field 'modes.turbo'"),
        ("- a\n- b\n", "a mapping of sections"),
        ("questions: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_prompt_file_names_file_and_field(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, "utf-8")
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_prompt_file() -> None:
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts("/nonexistent/prompts.yaml")


# ----------------------------------------------------------------------------------------------------- parser

GOOD = {"conversation_stage": "late_stage", "is_fraud": True, "reason": "要求转账", "confidence": 0.9}


def test_parse_well_formed_output() -> None:
    p = parse_output(f"<think>对方要求转账到安全账户。</think>\n<answer>{json.dumps(GOOD)}</answer>")
    assert p.ok and p.well_formed and p.has_tags
    assert p.think == "对方要求转账到安全账户。" and p.think_length == 12
    assert p.round is Round.FRAUD and p.label is True and p.canonical_label is True
    assert p.conversation_stage == "late_stage" and p.confidence == 0.9 and p.reason == "要求转账"
    assert not p.insufficient


def test_parse_fenced_json_with_text_after_answer() -> None:
    p = parse_output(f"<think>x</think><answer>```json\n{json.dumps(GOOD)}\n```</answer>\n谢谢！")
    assert p.label is True and p.trailing == "谢谢！"
    assert any("after </answer>" in problem for problem in p.problems)


def test_parse_nested_braces_and_raw_newlines() -> None:
    text = (
        '<think>x</think><answer>{"scene": "订餐服务", "reason": "a\nb", "meta": {"k": [1, {"j": 2}]}, '
        '"confidence": 1, "conversation_stage": "complete"}</answer>'
    )
    p = parse_output(text)
    assert p.answer is not None and p.answer["meta"] == {"k": [1, {"j": 2}]}
    assert p.label == "订餐服务" and p.reason == "a b"


def test_parse_truncated_output() -> None:
    p = parse_output("<think>对方自称公安，要求")
    assert p.think is None and p.answer is None and p.label is None
    assert "output ends inside <think> (truncated)" in p.problems
    p = parse_output('<think>x</think><answer>{"is_fraud": tr')
    assert "output ends inside <answer> (truncated)" in p.problems


def test_parse_insufficient_information() -> None:
    p = parse_output("<think>只听到问候。</think><answer>信息不足，请提供更多通话内容</answer>")
    assert p.insufficient and p.label is None and "the answer holds no JSON object" in p.problems
    p = parse_output(
        '<think>x</think><answer>{"conversation_stage": "early_stage", "is_fraud": null, '
        '"reason": "information insufficient", "confidence": 0.2}</answer>'
    )
    assert p.insufficient and p.well_formed


def test_parse_reports_invalid_labels_and_canonicalizes_aliases() -> None:
    p = parse_output('<answer>{"fraud_type": "bank fraud"}</answer>', round=Round.FRAUD_TYPE)
    assert p.label == "bank fraud" and p.canonical_label == "银行诈骗"
    assert any("not one of the allowed labels" in problem for problem in p.problems)
    p = parse_output('<answer>{"is_fraud": "yes", "conversation_stage": "middle"}</answer>')
    assert p.canonical_label is None
    assert any("conversation_stage 'middle'" in problem for problem in p.problems)


def test_parse_expected_round_selects_the_key() -> None:
    text = '<answer>{"scene": "订餐服务", "is_fraud": false}</answer>'
    assert parse_output(text).round is Round.SCENE
    assert parse_output(text, round="is_fraud").label is False


def test_parse_accepts_chat_message_completions() -> None:
    p = parse_output([{"role": "assistant", "content": '<answer>{"is_fraud": false}</answer>'}])
    assert p.label is False


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("latin-1")),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        ).map(lambda v: f"<think>t</think><answer>{json.dumps(v)}</answer>"),
    )
)
def test_parser_never_raises(text: str) -> None:
    p = parse_output(text)
    assert p.text == text
    assert p.think_length >= 0
    assert isinstance(p.problems, tuple)
    if p.well_formed:
        assert p.has_tags


def test_parser_survives_pathological_json() -> None:
    deep = "<think>x</think><answer>" + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "</answer>"
    assert parse_output(deep).answer is None
    huge_int = '<think>x</think><answer>{"confidence": ' + "9" * 10_000 + "}</answer>"
    assert parse_output(huge_int).answer is None
    assert parse_output(None).problems and parse_output(12).text == "12"
