"""The main job on a machine without a cluster or GPU: a short SAFE-QAQ stage-1 GRPO run, end to end.

Real TeleAntiFraud transcripts -> three-round prompts from the contract -> a tiny Qwen3 built on the spot ->
`swift rlhf --rlhf_type grpo` with teleguard's reward plugin -> the rewards the trainer logged, and the full
reward set applied to sample detector outputs so each rule can be seen at work.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from teleguard.contract import FRAUD, Mode, builtin_prompts
from teleguard.data.dataset import write_rows
from teleguard.data.ingest import ingest
from teleguard.data.records import CallRecord
from teleguard.data.rounds import RowBuilder, sample_of_call
from teleguard.data.timing import estimate_times
from teleguard.rewards import REWARDS
from teleguard.train.swift import CPU_OPTIONS, flags, latest_run_dir, plugin_args, run_swift

STAGE1_REWARDS = ["prompt_format", "adaptive_classification", "think_length_reward_300"]


def sample_calls(data_dir: Path, limit: int, seed: int = 0) -> list[CallRecord]:
    """Half fraud, half normal calls drawn from the TeleAntiFraud dialogue files."""
    files = sorted(data_dir.glob("*_dialogues-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no TeleAntiFraud dialogue files (*_dialogues-*.jsonl) in {data_dir}")
    calls, _ = ingest(files, "dialogues")
    rng = random.Random(seed)
    frauds = [c for c in calls if c.labels.is_fraud]
    normals = [c for c in calls if not c.labels.is_fraud]
    return rng.sample(frauds, limit // 2) + rng.sample(normals, limit - limit // 2)


# Short name -> output: correct and well-formed, a wrong label, a label outside the set, text after </answer>,
# truncated mid-thought, and correct but over-long reasoning.
SAMPLE_OUTPUTS = {
    "correct": '<think>来电自称银行客服，以账户异常为由索要验证码，并要求转账到"安全账户"，这是典型的冒充银行诈骗。'
    "</think>\n<answer>```json\n"
    '{"conversation_stage": "complete", "is_fraud": true, "reason": "索要验证码并要求转账", "confidence": 0.95}'
    "\n```</answer>",
    "wrong": '<think>对方是客服。</think><answer>{"conversation_stage": "complete", "is_fraud": false, '
    '"reason": "正常咨询", "confidence": 0.6}</answer>',
    "invalid": '<think>对方是客服。</think><answer>{"conversation_stage": "complete", '
    '"is_fraud": "maybe", "reason": "不确定", "confidence": 0.5}</answer>',
    "trailing": '<think>要求转账。</think><answer>{"conversation_stage": "complete", "is_fraud": true, '
    '"reason": "要求转账", "confidence": 0.9}</answer>\n以上是我的判断，希望对您有帮助。',
    "truncated": "<think>来电自称公安局，说您的账户涉嫌洗钱，需要",
    "long": "<think>" + "对方反复强调紧急，并要求保密，" * 40 + '</think><answer>{"conversation_stage": '
    '"complete", "is_fraud": true, "reason": "施压并要求保密", "confidence": 0.9}</answer>',
}


def score_samples() -> dict[str, dict[str, float]]:
    """Every reward on the sample outputs, for a fraud call (gold "fraud", complete)."""
    names = [n for n in REWARDS if n != "new_adaptive_classification"]
    texts = list(SAMPLE_OUTPUTS.values())
    columns = {"answers": [FRAUD] * len(texts), "conversation_stage": ["complete"] * len(texts)}
    values = {name: REWARDS[name](texts, **columns) for name in names}
    return {case: {name: values[name][i] for name in names} for i, case in enumerate(SAMPLE_OUTPUTS)}


def trainer_rewards(run_dir: Path) -> dict[str, float]:
    """Mean of each reward over every completion the trainer logged."""
    sums: dict[str, list[float]] = {}
    with (run_dir / "completions.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            for name in STAGE1_REWARDS:
                sums.setdefault(name, []).extend(float(v) for v in row.get(name, []))
    return {name: sum(v) / len(v) for name, v in sums.items() if v}


def run_demo(data_dir: Path, out_dir: Path, *, calls: int = 4, steps: int = 2) -> dict[str, Any]:
    from teleguard.tiny_models import build_tiny_model, corpus_from_paths

    out_dir.mkdir(parents=True, exist_ok=True)
    sample = sample_calls(data_dir, calls)
    builder = RowBuilder(builtin_prompts("zh"), Mode.OFFLINE, "text")
    dataset = out_dir / "stage1-grpo.jsonl"
    write_rows(
        dataset, (row for call in sample for row in builder.grpo_rows(sample_of_call(estimate_times(call))))
    )

    corpus = corpus_from_paths(sorted(data_dir.glob("*.jsonl"))[:2])
    model = build_tiny_model(out_dir / "tiny-qwen3", "qwen3", corpus)
    train_dir = out_dir / "grpo"
    options = {
        "rlhf_type": "grpo",
        "dataset": dataset,
        "reward_funcs": STAGE1_REWARDS,
        "use_vllm": False,
        "enable_thinking": True,  # the prompt ends in "<think>\n": the model reasons first
        "tuner_type": "lora",
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 48,
        "max_length": 4096,
        "temperature": 0.9,
        "learning_rate": 3e-5,
        "logging_steps": 1,
        "log_completions": True,
        "save_steps": steps,
        "output_dir": train_dir,
        **CPU_OPTIONS,
    }
    run_swift("rlhf", [*model.swift_args(), *plugin_args(), *flags(options)], log_path=out_dir / "grpo.log")
    run_dir = latest_run_dir(train_dir)
    summary = {
        "calls": [c.call_id for c in sample],
        "dataset": str(dataset),
        "model": str(model.path),
        "run_dir": str(run_dir),
        "trainer_reward_means": trainer_rewards(run_dir),
        "sample_output_rewards": score_samples(),
    }
    (out_dir / "demo-summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), "utf-8")
    return summary
