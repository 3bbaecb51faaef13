"""GRPO with vLLM rollouts on the CPU, for real: a recipe's grpo stage with `use_vllm: true` (colocate mode) runs
`swift rlhf` with a colocated vLLM engine (vLLM's CPU build) on a tiny Qwen3 with 64-wide heads; nothing is
stubbed.

What could go wrong and is checked:

- vLLM must generate the rollouts: only vLLM's rollouts carry their own log-probabilities, from which ms-swift
  logs `rollout_correction/*` (transformers rollouts log none), and teleguard's sync plugin logs every weight
  sync into vLLM's CPU model (one before each step's rollout).
- the sync must put the trained weights into vLLM. The LoRA adapter starts random (`init_weights: false`), so
  the trained policy differs from the model files vLLM loaded from the start; vLLM's rollout log-probabilities
  match the policy's only if the sync reached every layer. Measured on this tiny model: 0.0 with the sync,
  0.11-0.14 with vLLM left on its loaded weights (the mean log-perplexity difference of a step's completions).
  `lora_dropout: 0`: dropout in the trainer's log-probability pass would make them differ by itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from teleguard.rewards import REWARDS
from teleguard.tiny_models import TinyModel
from teleguard.train.config import load_recipe
from teleguard.train.stages import Runner, logged_rows, vllm_cpu_environment
from tests.support.recipes import QUICK_GRPO, write_recipe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: `make setup` installs vLLM's CPU build only where no GPU is present "
        "(a GPU machine needs PyPI's CUDA vllm, which the set-up leaves to the GPU image)",
    ),
]

STEPS = 2
OFF = {"enabled": False, "use_vllm": False}
SYNC = re.compile(r"teleguard: synced (\d+) tensors into vLLM on the CPU \(layerwise reload, sync (\d+)\)")


def test_grpo_rolls_out_with_colocated_vllm_on_the_cpu(
    tiny_vllm_model: TinyModel, text_datasets: Path, tmp_path: Path
) -> None:
    grpo = {
        **QUICK_GRPO,
        "use_vllm": True,
        "max_steps": STEPS,
        "extra": {"init_weights": False, "lora_dropout": 0.0},
    }
    stages = {"grpo": grpo, "sample": {"enabled": False, "engine": "transformers"}, "rsft": {"enabled": False},
              "lcrl": OFF, "realtime": OFF, "export": {"enabled": False}}  # fmt: skip
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", tiny_vllm_model, text_datasets, tmp_path / "run", stages)
    )
    assert recipe.stages.grpo.vllm.mode == "colocate"
    (result,) = Runner(recipe, log=lambda _: None).run_all()

    assert result.manifest["checkpoint"] == f"train/checkpoint-{STEPS}"
    assert (result.model / "config.json").is_file()
    log = (result.folder / "rlhf.log").read_text("utf-8")
    argv = " ".join(log.splitlines()[0].split())  # run_swift writes the command line first
    for flag in ("--use_vllm true", "--vllm_mode colocate", "--vllm_enforce_eager true", "swift_vllm_cpu.py"):
        assert flag in argv, flag
    syncs = [(int(n), int(i)) for n, i in SYNC.findall(log)]
    assert [i for _, i in syncs] == list(range(1, STEPS + 1)), syncs  # one sync before each step's rollout
    assert all(n > 0 for n, _ in syncs)

    steps = [r for r in logged_rows(result.folder / "train") if "loss" in r]
    assert len(steps) == STEPS
    for row in steps:
        assert "rewards/adaptive_classification/mean" in row
        assert row["rollout_correction/log_ppl_abs_diff"] < 1e-3, row  # vLLM sampled from the trained policy
    assert "rollout_correction/log_ppl_abs_diff" in result.manifest["metrics"]

    # the rewards were computed on vLLM's completions, two per step (one prompt, two generations)
    lines = (result.folder / "train" / "completions.jsonl").read_text("utf-8").splitlines()
    completions = [json.loads(line) for line in lines]
    assert {r["step"][0] for r in completions} == {str(step) for step in range(1, STEPS + 1)}
    for row in completions:
        assert len(row["completion"]) == QUICK_GRPO["num_generations"]
        assert row["prompt_format"] == pytest.approx(REWARDS["prompt_format"](row["completion"]))


def test_a_model_whose_heads_vllm_cpu_refuses_stops_before_training(tmp_path: Path) -> None:
    config = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16}
    (tmp_path / "config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(ValueError, match="attention heads 16 wide, which vLLM's CPU build does not run"):
        vllm_cpu_environment(tmp_path)
