"""A real `swift rlhf --rlhf_type grpo` run on CPU with the tiny Qwen2-Audio model, LoRA and both plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleguard.contract import Mode, builtin_prompts, round_of_answer
from teleguard.rewards import LOG_DIR_ENV
from teleguard.tiny_models import TinyModel
from teleguard.train.swift import latest_run_dir, run_swift
from tests.support.grpo_checks import SAMPLES, check_logged_rewards, check_reward_log, grpo_args

pytestmark = pytest.mark.slow

REWARD_NAMES = ["prompt_format", "adaptive_classification", "stage_classification"]


def write_dataset(path: Path, wav: Path) -> dict[str, tuple[str, str]]:
    """Audio rows (`<audio>` in the user turn, `audios`, `answers`, `conversation_stage`); returns
    call marker -> (gold, stage) so each logged completion can be traced back to its row."""
    prompts = builtin_prompts("zh")
    expected = {}
    with path.open("w", encoding="utf-8") as f:
        for i, (gold, stage) in enumerate(SAMPLES):
            marker = f"录音编号{i:03d}"
            prompt = prompts.user_prompt(round_of_answer(gold), Mode.REALTIME, audio=True)
            assert prompt.count("<audio>") == 1
            row = {
                "messages": [{"role": "user", "content": f"{prompt}\n（{marker}）"}],
                "audios": [str(wav)],
                "answers": gold,
                "conversation_stage": stage,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            expected[marker] = (gold, stage)
    return expected


def test_grpo_trains_qwen2_audio_with_lora_and_plugin_rewards(
    tiny_audio_model: TinyModel, wav_file: Path, tmp_path: Path
) -> None:
    expected = write_dataset(tmp_path / "train.jsonl", wav_file)
    log_dir = tmp_path / "reward-log"
    args = grpo_args(tiny_audio_model, tmp_path / "train.jsonl", tmp_path / "out", REWARD_NAMES, audio=True)
    run_swift("rlhf", args, log_path=tmp_path / "swift.log", env={LOG_DIR_ENV: str(log_dir)})
    run_dir = latest_run_dir(tmp_path / "out")

    # LoRA went onto the language model at its transformers-5 path (the plugin's module-key fix).
    adapter = run_dir / "checkpoint-2"
    assert (adapter / "adapter_model.safetensors").is_file()
    target = json.loads((adapter / "adapter_config.json").read_text("utf-8"))["target_modules"]
    assert "model\\.language_model" in str(target)

    # Both steps trained: one log line per step, with every reward logged under its plugin name.
    steps = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text("utf-8").splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert [s["global_step/max_steps"] for s in steps] == ["1/2", "2/2"]
    assert all(f"rewards/{name}/mean" in steps[0] for name in REWARD_NAMES)

    # Each logged completion's rewards, recomputed from the completion and its row's columns, agree, and the
    # reward plugin saw the dataset columns of the audio rows themselves.
    checked = check_logged_rewards(run_dir, expected, REWARD_NAMES)
    assert checked >= 4  # two steps of one prompt with two generations
    check_reward_log(log_dir, expected, REWARD_NAMES, checked)
