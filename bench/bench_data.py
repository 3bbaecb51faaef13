"""Data benchmark: ingest every shared TeleAntiFraud dialogue and build the text datasets of every stage.

    python bench/bench_data.py [--data ../shared/data/teleantifraud-dialogues] [--out results.json]

Reports the wall time of each step (ingest + timing, split, build sft/grpo/realtime rows) on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from teleguard.data.dataset import build_split
from teleguard.data.ingest import ingest
from teleguard.data.splits import split_calls
from teleguard.data.timing import estimate_times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/teleantifraud-dialogues"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    files = sorted(args.data.glob("*_dialogues-*.jsonl"))

    t0 = time.perf_counter()
    calls, _ = ingest(files, "dialogues")
    calls = [estimate_times(c) for c in calls]
    t1 = time.perf_counter()
    parts = split_calls(calls)
    t2 = time.perf_counter()
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in parts.items():
            card = build_split(part, Path(tmp) / name)
            rows += sum(card["rows"].values())
    t3 = time.perf_counter()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "calls": len(calls),
        "rows": rows,
        "ingest_s": round(t1 - t0, 2),
        "split_s": round(t2 - t1, 2),
        "build_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), "utf-8")


if __name__ == "__main__":
    main()
