"""Audio synthesis benchmark: seconds of call audio that `synthesize_call` produces per wall-clock second.

Synthesizes N calls from the shared TeleAntiFraud transcripts (taken in turn from each .jsonl file, so fraud
and normal calls mix) with espeak-ng into stereo 16 kHz WAVs, and prints the throughput with the machine
(cores, Python, espeak-ng) for docs/benchmarks.md. The first call also pays espeak-ng's one-off voice probe.

    python bench/bench_audio.py [--calls 20] [--workers N] [--data DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from teleguard.data.audio import espeak_version, synthesize_call
from teleguard.data.records import CallLabels, CallRecord, Turn

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "teleantifraud-dialogues"


def transcripts(data: Path) -> Iterator[CallRecord]:
    """Calls round-robin over the files; turns alternate left, right, ... (left speaks first)."""

    def calls(path: Path) -> Iterator[CallRecord]:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                pairs = itertools.zip_longest(row["left"], row["right"])
                texts = [(s, t) for pair in pairs for s, t in zip(("left", "right"), pair, strict=True) if t]
                yield CallRecord(
                    call_id=f"{path.stem}/{row['tts_id']}",
                    source="teleantifraud-dialogues",
                    turns=tuple(Turn(speaker=s, text=t) for s, t in texts),
                    # Labels do not matter here; only is_fraud is set so the canonical label lists are not needed.
                    labels=CallLabels(is_fraud=path.name.startswith("fraud")),
                )

    streams = [calls(p) for p in sorted(data.glob("*.jsonl"))]
    if not streams:
        raise SystemExit(f"no .jsonl transcripts in {data}")
    for group in itertools.zip_longest(*streams):
        yield from (call for call in group if call is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None, help="threads per call (default: one per core)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    records = list(itertools.islice(transcripts(args.data), args.calls))
    audio_s = 0.0
    turns = 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i, record in enumerate(records):
            timed = synthesize_call(record, Path(tmp) / f"{i}.wav", workers=args.workers)
            audio_s += timed.duration or 0.0
            turns += len(timed.turns)
        wall_s = time.perf_counter() - start

    result = {
        "calls": len(records),
        "turns": turns,
        "audio_seconds": round(audio_s, 1),
        "wall_seconds": round(wall_s, 2),
        "audio_seconds_per_second": round(audio_s / wall_s, 1),
        "mean_call_seconds": round(audio_s / len(records), 1),
        "workers": args.workers or "one per core",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
        "espeak_ng": espeak_version().split("  ")[0],
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.out:
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
