"""A real `swift rlhf --rlhf_type grpo` run on CPU with a tiny text model and teleguard's reward plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleguard.contract import Mode, builtin_prompts, round_of_answer
from teleguard.rewards import LOG_DIR_ENV
from teleguard.train.swift import SwiftError, latest_run_dir, run_swift
from tests.support.grpo_checks import SAMPLES, check_logged_rewards, check_reward_log, grpo_args

pytestmark = pytest.mark.slow

REWARD_NAMES = [
    "prompt_format",
    "adaptive_classification",
    "stage_classification",
    "think_length_penalty_200",
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


def test_grpo_calls_the_plugin_rewards_with_dataset_columns(tiny_text_model, tmp_path: Path) -> None:
    expected = write_dataset(tmp_path / "train.jsonl")
    args = grpo_args(tiny_text_model, tmp_path / "train.jsonl", tmp_path / "out", REWARD_NAMES)
    # the prompt ends in "<think>\n" so that the model reasons first, as SAFE-QAQ's models do
    args += ["--enable_thinking", "true"]
    run_swift("rlhf", args, log_path=tmp_path / "swift.log", env={LOG_DIR_ENV: str(tmp_path / "reward-log")})
    run_dir = latest_run_dir(tmp_path / "out")
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()
    checked = check_logged_rewards(run_dir, expected, REWARD_NAMES)
    assert checked >= 4  # two steps of at least one prompt with two generations
    check_reward_log(tmp_path / "reward-log", expected, REWARD_NAMES, checked)


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
