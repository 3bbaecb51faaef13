"""Data steps: the datasets of every stage from raw call data, and their audio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Calls per evaluation set in the pipeline: few, as every compared model is evaluated on every set, on CPU too.
PIPELINE_EVAL_SET_SIZE = 32


def _source_files(data_uri: str) -> list[Path]:
    from teleguard.storage import local_copy

    folder = local_copy(data_uri) if "://" in data_uri else Path(data_uri)
    if folder.is_file():
        return [folder]
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in (".jsonl", ".json") and p.name != "manifest.json"
    )
    if not files:
        raise FileNotFoundError(f"{data_uri}: no .jsonl or .json files")
    return files


def build_data_step(
    data_uri: str,
    out_calls: Path,
    out_datasets: Path,
    *,
    source_format: str = "dialogues",
    prompts: str | None = None,
    max_transcript_chars: int | None = None,
    evidence_chars: int | None = None,
    split_seed: int = 0,
    eval_sets: list[str] | None = None,
    eval_set_size: int = PIPELINE_EVAL_SET_SIZE,
) -> dict[str, Any]:
    """Ingest (bad rows skipped and counted), split by call, and build every stage's text datasets, with the
    evaluation sets `eval_sets` (None: all) of up to `eval_set_size` calls (few: evaluation runs on CPU too)."""
    from teleguard.data.dataset import build_datasets, write_calls
    from teleguard.data.eval_sets import EVAL_SETS_DIR
    from teleguard.data.ingest import ingest
    from teleguard.data.splits import SplitSpec, split_calls
    from teleguard.data.timing import estimate_times

    calls, report = ingest(_source_files(data_uri), source_format, on_error="skip")  # type: ignore[arg-type]
    calls = [estimate_times(c) for c in calls]
    for name, part in split_calls(calls, SplitSpec(seed=split_seed)).items():
        write_calls(out_calls / name, part, title=f"{name} split", rejected=len(report.rejected))
    cards = build_datasets(
        out_calls,
        out_datasets,
        prompts=prompts,
        max_transcript_chars=max_transcript_chars,
        evidence_chars=evidence_chars,
        eval_sets=eval_sets,
        eval_set_size=eval_set_size,
    )
    index_file = out_datasets / EVAL_SETS_DIR / "card.json"
    index = json.loads(index_file.read_text("utf-8")) if index_file.is_file() else {}
    return {
        "calls": len(calls),
        "rejected": len(report.rejected),
        "rows": {k: v["rows"] for k, v in cards.items()},
        "eval_sets": index.get("built", {}),
    }


def synthesize_audio_step(
    calls: Path, out_calls: Path, out_datasets: Path, *, limit: int | None = None, prompts: str | None = None
) -> dict[str, Any]:
    """Synthesize audio for (the first `limit` calls of) each split and build the audio datasets (with the
    evaluation sets that keep their audio: gold, very_short)."""
    from teleguard.data.audio import synthesize_call
    from teleguard.data.audio_clips import ClipWriter
    from teleguard.data.dataset import CALLS_FILE, build_datasets, read_calls, write_calls
    from teleguard.data.splits import SPLITS

    counts = {}
    for name in SPLITS:
        if not (calls / name / CALLS_FILE).is_file():
            continue
        folder = out_calls / name
        voiced = [
            synthesize_call(call, folder / "audio" / f"{i:06d}.wav")
            for i, call in enumerate(read_calls(calls / name)[:limit])
        ]
        write_calls(folder, voiced, title=f"{name} split with audio")
        counts[name] = len(voiced)
    cards = build_datasets(
        out_calls, out_datasets, modality="audio", prompts=prompts, clip_maker=ClipWriter(out_datasets),
        eval_set_size=PIPELINE_EVAL_SET_SIZE,
    )  # fmt: skip
    return {"calls": counts, "rows": {k: v["rows"] for k, v in cards.items()}}
