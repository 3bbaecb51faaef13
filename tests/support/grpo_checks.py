"""Shared by the GRPO tests: the options of a tiny CPU run and the checks on what the trainer logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from teleguard.rewards import REWARDS
from teleguard.tiny_models import TinyModel
from teleguard.train.swift import CPU_OPTIONS, flags, plugin_args

SAMPLES = [  # (gold answer, conversation stage): every round and every stage
    ("fraud", "complete"),
    ("normal", "late_stage"),
    ("订餐服务", "early_stage"),
    ("银行诈骗", "complete"),
]


def grpo_args(
    model: TinyModel, dataset: Path, output_dir: Path, rewards: list[str], audio: bool = False
) -> list[str]:
    options: dict[str, Any] = {
        "rlhf_type": "grpo",
        "dataset": dataset,
        "reward_funcs": rewards,
        "use_vllm": False,
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
    return [*model.swift_args(), *plugin_args(audio=audio), *flags(options)]


def check_logged_rewards(run_dir: Path, expected: dict[str, tuple[str, str]], rewards: list[str]) -> int:
    """Recompute every logged reward from its completion and the columns of its row (found by the marker in
    the prompt); they must agree. Returns how many completions were checked."""
    checked, seen = 0, set()
    for line in (run_dir / "completions.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        key = (tuple(row["step"]), tuple(row["completion"]))
        if key in seen:  # ms-swift logs the last step twice (at the step and at the end of training)
            continue
        seen.add(key)
        for i, (prompt, completion) in enumerate(zip(row["prompt"], row["completion"], strict=True)):
            gold, stage = next(v for marker, v in expected.items() if marker in prompt)
            for name in rewards:
                value = REWARDS[name]([completion], answers=[gold], conversation_stage=[stage])[0]
                assert row[name][i] == pytest.approx(value), (name, completion)
            checked += 1
    return checked


def check_reward_log(
    log_dir: Path, expected: dict[str, tuple[str, str]], rewards: list[str], completions: int
) -> None:
    """The plugin itself saw the dataset columns: its log holds each sample's gold answer and stage."""
    logged = [json.loads(x) for x in (log_dir / "rewards-rank0.jsonl").read_text("utf-8").splitlines()]
    adaptive = [r for r in logged if r["reward"] == "adaptive_classification"]
    assert len(adaptive) == completions
    assert {(r["answers"], r["conversation_stage"]) for r in adaptive} <= set(expected.values())
    assert {r["reward"] for r in logged} == set(rewards)
