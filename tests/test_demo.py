"""The main job (`make demo`) end to end, with fewer calls and steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleguard.demo import STAGE1_REWARDS, run_demo

from .conftest import TRANSCRIPTS_DIR

pytestmark = pytest.mark.slow


def test_demo_runs_stage1_grpo_and_scores_samples(tmp_path: Path) -> None:
    if not TRANSCRIPTS_DIR.is_dir():
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    summary = run_demo(TRANSCRIPTS_DIR, tmp_path, calls=2, steps=1)
    assert json.loads((tmp_path / "demo-summary.json").read_text("utf-8")) == summary
    assert len(summary["calls"]) == 2
    assert set(summary["trainer_reward_means"]) == set(STAGE1_REWARDS)
    rows = [json.loads(x) for x in Path(summary["dataset"]).read_text("utf-8").splitlines()]
    assert {r["task"] for r in rows} >= {"is_fraud"} and all(
        r["conversation_stage"] == "complete" for r in rows
    )
    samples = summary["sample_output_rewards"]
    assert samples["correct"]["prompt_format"] == 1.0 and samples["correct"]["fraud_classification"] == 5.0
    assert (
        samples["invalid"]["fraud_classification"] == -3.0 and samples["wrong"]["fraud_classification"] == 0.0
    )
    assert samples["trailing"]["prompt_format"] < 1.0 and samples["truncated"]["prompt_format"] == 0.0
    assert samples["long"]["think_length_penalty_200"] < 0 == samples["correct"]["think_length_penalty_200"]
