"""The seed recipes' library parts without a model: preference pairs, distillation targets, recipe checks."""

from __future__ import annotations

from typing import Any

import pytest

from teleguard.contract import Round, parse_output
from teleguard.contract.answers import format_answer
from teleguard.engines import Prompt, SamplingParams
from teleguard.train.config import RecipeError, load_recipe
from teleguard.train.distill import distill_rows, rationale_of, student_target, teacher_prompt
from teleguard.train.preferences import preference_pairs
from teleguard.train.sampling import is_correct
from tests.support.paths import REPO

PROMPT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "通话记录：……是否诈骗？"}]


def row(gold: str = "fraud", samples: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"messages": PROMPT, "answers": gold, "conversation_stage": "complete", "task": "is_fraud",
            "call_id": "c1", "samples": samples or [], **extra}  # fmt: skip


def said(label: bool, think: str) -> str:
    return format_answer(Round.FRAUD, label, think=think)


def test_pairs_put_the_shortest_correct_over_the_worst_wrong() -> None:
    short, long_ = said(True, "短"), said(True, "很长的推理" * 40)
    wrong, broken = said(False, "错"), "no answer at all"
    pairs, report = preference_pairs([row(samples=[long_, wrong, short, broken])])
    assert len(pairs) == 1 and report.wrong_rejected == 1
    pair = pairs[0]
    assert pair["messages"][-1] == {"role": "assistant", "content": short}
    assert pair["messages"][:-1] == PROMPT and "samples" not in pair
    assert pair["rejected_response"] == broken  # format 0 + wrong scores below a well-formed wrong answer
    assert pair["answers"] == "fraud"


def test_all_correct_pairs_short_over_long_only_when_much_longer() -> None:
    short, long_ = said(True, "短短"), said(True, "很长的推理" * 40)
    pairs, report = preference_pairs([row(samples=[long_, short])], length_ratio=1.5)
    assert [p["rejected_response"] for p in pairs] == [long_] and report.long_rejected == 1
    pairs, report = preference_pairs([row(samples=[short, short])], length_ratio=1.5)
    assert pairs == [] and report.no_contrast == 1


def test_no_correct_sample_uses_the_gold_reference() -> None:
    wrong = said(False, "错")
    pairs, report = preference_pairs([row(samples=[wrong])])
    chosen = pairs[0]["messages"][-1]["content"]
    assert report.reference_chosen == 1 and is_correct(chosen, "fraud", "complete")
    assert pairs[0]["rejected_response"] == wrong


def test_distillation_names_the_gold_answer_and_keeps_the_teachers_reasoning() -> None:
    prompt = teacher_prompt(row(gold="normal"))
    assert "参考答案：normal" in prompt.messages[-1]["content"] and prompt.messages[0] == PROMPT[0]
    assert PROMPT[-1]["content"] == "通话记录：……是否诈骗？"  # the row itself is not changed
    assert rationale_of("<think>因为对方索要验证码</think><answer>x</answer>", 100) == "因为对方索要验证码"
    assert rationale_of("对方索要验证码<answer>x</answer>", 4) == "对方索要"
    target = student_target(row(gold="normal"), "正常的快递通知")
    parsed = parse_output(target)
    assert parsed.think == "正常的快递通知" and is_correct(target, "normal", "complete")
    scene = student_target(row(gold="咨询客服", task="scene"), "客服咨询")
    assert is_correct(scene, "咨询客服", "complete")


class FixedTeacher:
    """A teacher that answers from a table: one rationale per call (a model-free stand-in for the unit test;
    the recipe tests run the real teacher)."""

    def __init__(self, outputs: list[str]) -> None:
        self.outputs, self.prompts = outputs, []

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[str]]:
        self.prompts += prompts
        return [[self.outputs[len(self.prompts) - len(prompts) + i]] for i in range(len(prompts))]


def test_distill_rows_drops_empty_rationales_and_counts_them() -> None:
    teacher = FixedTeacher(["<think>可疑转账</think>", "<think></think><answer>{}</answer>", "冒充客服"])
    rows = [row(call_id="a"), row(call_id="b"), row(gold="normal", call_id="c")]
    kept, report = distill_rows(teacher, rows, SamplingParams(), batch_size=2)
    assert [r["call_id"] for r in kept] == ["a", "c"]
    assert report == {"prompts": 3, "kept": 2, "dropped_empty": 1, "mean_rationale_chars": 4.0}
    assert all(is_correct(r["messages"][-1]["content"], r["answers"], "complete") for r in kept)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"stages.grpo.reward_funcs": ["adaptive_classification", "teacher_judge"]}, "needs a judge section"),
        ({"stages.grpo.reward_funcs": ["fraud_classifier"]}, "needs stages.classifier enabled"),
        ({"stages.rm.enabled": True, "stages.sample.enabled": False, "stages.rsft.enabled": False},
         "stages.rm needs stages.sample"),
        ({"stages.rsft.selection": "reward_model"}, "needs stages.rm enabled"),
        ({"stages.distill.enabled": True}, "needs a teacher"),
    ],
)  # fmt: skip
def test_recipe_refuses_seed_stages_without_what_they_need(override: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / "safe-qaq" / "tiny-cpu.yaml", override)


@pytest.mark.parametrize("name", ["teacher-judge", "classifier-reward", "distill-cascade", "rm-dpo"])
@pytest.mark.parametrize("size", ["tiny-cpu", "qwen2-audio-7b"])
def test_seed_recipe_files_load(name: str, size: str) -> None:
    recipe = load_recipe(REPO / "recipes" / name / f"{size}.yaml")
    assert recipe.enabled()[-1] == "export"
    assert set(recipe.enabled()) - {"sft", "grpo", "export"} or name == "teacher-judge"
