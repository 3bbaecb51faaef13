"""Reward benchmark: the full SAFE-QAQ reward set as a GRPO trainer calls it.

One "call" is what the trainer does per step: every reward function over one batch of 27 completions
(3 prompts x 9 generations), with the columns ms-swift passes. The benchmark makes 5,000 calls with the
reward log on (append-only JSON lines) and reports completions per second and the ratio of the time of the
last 500 calls to the first 500. Side by side, in the same run, a log that re-reads and rewrites one JSON
file on every call (SAFE-QAQ's logging) shows the growth that the append-only log avoids.

    python bench/bench_rewards.py [--calls 5000] [--baseline-calls 600] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from teleguard import rewards
from teleguard.contract import FRAUD_TYPE_NAMES, SCENE_NAMES, STAGES
from teleguard.rewards import REWARDS, RULE_REWARDS

BATCH = 27
NAMES = list(RULE_REWARDS)  # the model-backed rewards need a judge or classifier: timed by their own tests
PHRASES = [
    "对方自称是银行客服，",
    "声称我的账户存在异常交易，",
    "要求我提供短信验证码，",
    "并引导我把资金转入所谓的安全账户。",
    "通话中对方语气急促，反复催促，",
    "这与正规银行的做法不符。",
    "The caller asked for the OTP code, ",
    "用户一开始表示怀疑，",
    "但对方报出了用户的部分身份信息，",
    "这是典型的冒充客服类诈骗话术。",
]


def completion(rng: random.Random, i: int) -> str:
    """A realistic detector output: 150-600 characters of reasoning, a JSON answer, sometimes defects."""
    think = "".join(rng.choice(PHRASES) for _ in range(rng.randint(8, 30))) + f"（第{i}通）"
    key, value = rng.choice(
        [("is_fraud", rng.choice(["true", "false"])), ("scene", json.dumps(rng.choice(SCENE_NAMES))),
         ("fraud_type", json.dumps(rng.choice(FRAUD_TYPE_NAMES)))]
    )  # fmt: skip
    answer = (
        f'{{"conversation_stage": "{rng.choice(STAGES)}", "{key}": {value}, '
        f'"reason": "{think[:40]}", "confidence": {rng.random():.2f}}}'
    )
    roll = rng.random()
    if roll < 0.5:
        answer = f"```json\n{answer}\n```"
    elif roll < 0.6:
        answer = answer[: rng.randint(5, len(answer))]  # truncated
    tail = "\n以上是分析。" if rng.random() < 0.1 else ""
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>{tail}"


def make_batches(calls: int, seed: int = 0) -> list[tuple[list[str], dict[str, list[str]]]]:
    rng = random.Random(seed)
    batches = []
    for c in range(calls):
        texts = [completion(rng, c * BATCH + j) for j in range(BATCH)]
        golds = [rng.choice([*SCENE_NAMES, "fraud", "normal", *FRAUD_TYPE_NAMES]) for _ in range(BATCH)]
        stages = [rng.choice(STAGES) for _ in range(BATCH)]
        batches.append((texts, {"answers": golds, "conversation_stage": stages}))
    return batches


def run_calls(batches, after_call=None) -> list[float]:
    """Seconds per call of the full reward set."""
    times = []
    for texts, columns in batches:
        start = time.perf_counter()
        values = {name: REWARDS[name](texts, **columns) for name in NAMES}
        if after_call:
            after_call(texts, values)
        times.append(time.perf_counter() - start)
    return times


def rewriting_log(path: Path):
    """The anti-pattern: load the whole JSON log, append this call's rows, write it all back."""

    def write(texts, values):
        rows = json.loads(path.read_text("utf-8")) if path.exists() else []
        rows.extend({"response": t, **{n: v[i] for n, v in values.items()}} for i, t in enumerate(texts))
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")

    return write


def summarize(times: list[float], window: int) -> dict[str, float]:
    first, last = sum(times[:window]), sum(times[-window:])
    return {
        "calls": len(times),
        "completions_per_s": len(times) * BATCH / sum(times),
        "first_window_s": first,
        "last_window_s": last,
        "last_over_first": last / first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--baseline-calls", type=int, default=600)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    batches = make_batches(args.calls)
    with tempfile.TemporaryDirectory() as tmp:
        rewards.enable_reward_log(Path(tmp) / "append")
        appended = summarize(run_calls(batches), args.window)
        rewards.enable_reward_log(None)
        no_log = summarize(run_calls(make_batches(args.calls, seed=1)), args.window)
        base_window = min(args.window, args.baseline_calls // 5)
        rewriting = summarize(
            run_calls(make_batches(args.baseline_calls, seed=2), rewriting_log(Path(tmp) / "rewrite.json")),
            base_window,
        )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "batch": BATCH,
        "rewards": NAMES,
        "append_only_log": appended,
        "no_log": no_log,
        "rewrite_whole_log_baseline": rewriting,
    }
    print(f"machine: {result['machine']}; {len(NAMES)} rewards per call, {BATCH} completions per call")
    print("| variant | calls | completions/s | last/first window |")
    print("|---|---|---|---|")
    for name, key in [("append-only log (teleguard)", "append_only_log"), ("no log", "no_log"),
                      ("re-read + rewrite JSON log", "rewrite_whole_log_baseline")]:  # fmt: skip
        r = result[key]
        print(f"| {name} | {r['calls']} | {r['completions_per_s']:.0f} | {r['last_over_first']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), "utf-8")


if __name__ == "__main__":
    main()
