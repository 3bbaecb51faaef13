"""Dataset cards: what a folder of calls or rows holds, as JSON (for machines) and Markdown (for people)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from teleguard.data.records import CallRecord


def call_card(calls: list[CallRecord], **extra: Any) -> dict[str, Any]:
    durations = [c.duration for c in calls if c.duration is not None]
    card: dict[str, Any] = {
        "calls": len(calls),
        "fraud": sum(c.labels.is_fraud for c in calls),
        "normal": sum(not c.labels.is_fraud for c in calls),
        "per_label": dict(Counter(c.labels.name for c in calls).most_common()),
        "per_source": dict(Counter(c.source for c in calls).most_common()),
        "with_audio": sum(c.audio is not None for c in calls),
        "turns": sum(len(c.turns) for c in calls),
    }
    if durations:
        card["duration_s"] = {
            "total_hours": round(sum(durations) / 3600, 2),
            "mean": round(statistics.fmean(durations), 2),
            "median": round(statistics.median(durations), 2),
            "min": round(min(durations), 2),
            "max": round(max(durations), 2),
            "timed_calls": len(durations),
        }
    card.update(extra)
    return card


def write_card(folder: Path, card: dict[str, Any], title: str) -> None:
    (folder / "card.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", "utf-8")
    lines = [f"# {title}", ""]
    for key, value in card.items():
        if isinstance(value, dict):
            lines += ["", f"## {key}", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in value.items()]
            lines.append("")
        else:
            lines.append(f"- **{key}**: {value}")
    (folder / "card.md").write_text("\n".join(lines) + "\n", "utf-8")
