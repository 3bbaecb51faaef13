"""A real `swift rlhf --rlhf_type grpo` run on CPU with a tiny text model and teleguard's reward plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleguard.contract import Mode, builtin_prompts, round_of_answer
from teleguard.rewards import REWARDS
from teleguard.train.swift import CPU_OPTIONS, SwiftError, flags, latest_run_dir, plugin_args, run_swift

pytestmark = pytest.mark.slow

REWARD_NAMES = [
    "prompt_format",
    "adaptive_classification",
    "stage_classification",
    "think_length_penalty_200",
]
SAMPLES = [  # (gold answer, conversation stage): every round and every stage
    ("fraud", "complete"),
    ("normal", "late_stage"),
    ("订餐服务", "early_stage"),
    ("银行诈骗", "complete"),
]


def write_dataset(path: Path) -> dict[str, tuple[str, str]]:
    """Rows with `answers` and `conversation_stage`; returns call marker -> (gold, stage)."""
    prompts = builtin_prompts("zh")
    expected = {}
    with path.open("w", encoding="utf-8") as f:
        for i, (gold, stage) in enumerate(SAMPLES):
            marker = f"通话编号{i:03d}"
            transcript = f"左：您好，这里是客服中心，{marker}。\n右：请问有什么事？"
            prompt = prompts.user_prompt(round_of_answer(gold), Mode.REALTIME, transcript=transcript)
            row = {
                "messages": [{"role": "user", "content": prompt}],
                "answers": gold,
                "conversation_stage": stage,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            expected[marker] = (gold, stage)
    return expected


def grpo_args(model, dataset: Path, output_dir: Path, rewards: list[str]) -> list[str]:
    options = {
        "rlhf_type": "grpo",
        "dataset": dataset,
        "reward_funcs": rewards,
        "use_vllm": False,
        "enable_thinking": True,
        "tuner_type": "lora",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 16,
        "max_length": 2048,
        "logging_steps": 1,
        "log_completions": True,
        "save_steps": 2,
        "output_dir": output_dir,
        **CPU_OPTIONS,
    }
    return [*model.swift_args(), *plugin_args(), *flags(options)]


def test_grpo_calls_the_plugin_rewards_with_dataset_columns(tiny_text_model, tmp_path: Path) -> None:
    expected = write_dataset(tmp_path / "train.jsonl")
    log_dir = tmp_path / "reward-log"
    run_swift(
        "rlhf",
        grpo_args(tiny_text_model, tmp_path / "train.jsonl", tmp_path / "out", REWARD_NAMES),
        log_path=tmp_path / "swift.log",
        env={"TELEGUARD_REWARD_LOG_DIR": str(log_dir)},
    )
    run_dir = latest_run_dir(tmp_path / "out")
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()

    # The trainer logged each completion with the value of every plugin reward: recompute them from the
    # completion and the dataset columns of its prompt, and they must agree exactly.
    checked, seen = 0, set()
    for line in (run_dir / "completions.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        key = (tuple(row["step"]), tuple(row["completion"]))
        if key in seen:  # ms-swift logs the last step twice (at the step and at the end of training)
            continue
        seen.add(key)
        for i, (prompt, completion) in enumerate(zip(row["prompt"], row["completion"], strict=True)):
            marker = next(m for m in expected if m in prompt)
            gold, stage = expected[marker]
            for name in REWARD_NAMES:
                value = REWARDS[name]([completion], answers=[gold], conversation_stage=[stage])[0]
                assert row[name][i] == pytest.approx(value), (name, completion)
            checked += 1
    assert checked >= 4  # two steps of at least one prompt with two generations

    # The plugin itself saw the columns: its reward log holds each sample's gold answer and stage.
    logged = [json.loads(x) for x in (log_dir / "rewards-rank0.jsonl").read_text("utf-8").splitlines()]
    adaptive = [r for r in logged if r["reward"] == "adaptive_classification"]
    assert len(adaptive) == checked
    assert {(r["answers"], r["conversation_stage"]) for r in adaptive} <= set(expected.values())
    assert {r["reward"] for r in logged} == {"prompt_format", "adaptive_classification", "stage_classification",
                                             "think_length_penalty_200"}  # fmt: skip


def test_grpo_without_required_column_fails_naming_it(tiny_text_model, tmp_path: Path) -> None:
    dataset = tmp_path / "train.jsonl"
    with dataset.open("w", encoding="utf-8") as f:
        for gold, _ in SAMPLES:
            row = {"messages": [{"role": "user", "content": f"判断：{gold}"}], "answers": gold}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with pytest.raises(SwiftError, match="conversation_stage"):
        run_swift(
            "rlhf",
            grpo_args(tiny_text_model, dataset, tmp_path / "out", ["stage_classification"]),
            log_path=tmp_path / "swift.log",
        )
