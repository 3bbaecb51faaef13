"""Every stage of a recipe has a runner in the Runner's explicit table; an unknown one is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from teleguard.train.config import STAGES, load_recipe
from teleguard.train.stages import Runner
from tests.support.paths import REPO


def runner(tmp_path: Path) -> Runner:
    recipe = load_recipe(str(REPO / "recipes" / "safe-qaq" / "tiny-cpu.yaml"), {"output_dir": str(tmp_path)})
    return Runner(recipe, log=lambda _: None)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_runner(stage: str, tmp_path: Path) -> None:
    assert callable(runner(tmp_path)._stage_runner(stage))


def test_stages_of_one_kind_share_a_runner(tmp_path: Path) -> None:
    r = runner(tmp_path)
    assert r._stage_runner("rsft") == r._stage_runner("distill") == r._run_sft
    assert r._stage_runner("lcrl") == r._stage_runner("realtime") == r._run_grpo


def test_an_unknown_stage_names_the_runners(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no runner for stage 'nope' \(method 'nope'\); runners: sft, "):
        runner(tmp_path)._stage_runner("nope")
