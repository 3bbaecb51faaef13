"""`teleguard data ...`: ingest, audio, prefixes, split, build."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track

from teleguard.data.ingest import FORMATS, IngestError, ingest
from teleguard.data.prefixes import PrefixPolicy, cut_prefixes
from teleguard.data.splits import SplitSpec, split_calls
from teleguard.data.timing import SpeechRate, estimate_times

app = typer.Typer(help="Call data: ingest, synthesize audio, cut prefixes, split, build ms-swift datasets.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths and file:line stay on one line


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def _local_input(location: str) -> Path:
    """A local folder for a path or a storage URI (s3://, minio://: downloaded and checked against its manifest)."""
    from teleguard.storage import LocalLocation, StorageError, local_copy, parse_uri

    try:
        where = parse_uri(location)
        path = where.path if isinstance(where, LocalLocation) else local_copy(location)
    except (StorageError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not path.exists():
        _fail(f"{location}: no such file or folder")
    return path


@contextmanager
def _local_output(location: str) -> Iterator[Path]:
    """Write into a local folder; for a storage URI, a temporary one uploaded with a manifest at the end."""
    from teleguard.storage import LocalLocation, StorageError, parse_uri, put_dir

    try:
        where = parse_uri(location)
    except ValueError as err:
        _fail(str(err))
    if isinstance(where, LocalLocation):
        yield where.path
        return
    with tempfile.TemporaryDirectory(prefix="teleguard-") as tmp:
        yield Path(tmp)
        try:
            manifest = put_dir(Path(tmp), location)
        except StorageError as err:
            _fail(str(err))
        console.print(f"uploaded {len(manifest.files)} files to {location}")


def _calls(location: str):
    from teleguard.data.dataset import read_calls

    try:
        return read_calls(_local_input(location))
    except IngestError as err:
        _fail(str(err))


@app.command("ingest")
def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="source files")],
    out: Annotated[str, typer.Option(help="calls folder to write (calls.jsonl + card): a path or s3:// URI")],
    format: Annotated[str, typer.Option(help=f"one of {', '.join(FORMATS)}")] = "dialogues",
    skip: Annotated[bool, typer.Option("--skip/--fail", help="skip bad rows (default: fail on any)")] = False,
    cjk_per_s: Annotated[float, typer.Option(help="speech rate for estimated turn times")] = 4.5,
    words_per_s: Annotated[float, typer.Option(help="English words per second")] = 2.5,
) -> None:
    """Read source files into teleguard call records, with a dataset card. Turn times are estimated."""
    from teleguard.data.dataset import write_calls

    if format not in FORMATS:
        _fail(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    try:
        calls, report = ingest(paths, format, on_error="skip" if skip else "fail")  # type: ignore[arg-type]
    except (IngestError, FileNotFoundError) as err:
        _fail(str(err))
    rate = SpeechRate(cjk_chars_per_s=cjk_per_s, words_per_s=words_per_s)
    calls = [estimate_times(c, rate) for c in track(calls, description="timing turns")]
    for rejection in report.rejected:
        err_console.print(f"[yellow]skipped[/yellow] {rejection}", highlight=False)
    with _local_output(out) as folder:
        write_calls(
            folder,
            calls,
            title="ingested calls",
            format=format,
            inputs=[str(p) for p in paths],
            rejected=len(report.rejected),
            per_file=report.per_file,
        )
    console.print(f"{report.accepted} calls accepted, {len(report.rejected)} rejected -> {out}")


@app.command("split")
def split_command(
    calls: Annotated[str, typer.Argument(help="calls folder (path or s3:// URI)")],
    out: Annotated[str, typer.Option(help="folder for train/dev/test calls folders (path or s3:// URI)")],
    train: float = 0.8,
    dev: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
) -> None:
    """Split calls into train/dev/test by call, stratified by label, deterministically."""
    from pydantic import ValidationError

    from teleguard.data.dataset import write_calls

    try:
        spec = SplitSpec(train=train, dev=dev, test=test, seed=seed)
    except ValidationError as err:
        _fail(err.errors(include_url=False)[0]["msg"])
    parts = split_calls(_calls(calls), spec)
    with _local_output(out) as folder:
        for name, part in parts.items():
            write_calls(folder / name, part, title=f"{name} split", split=name, seed=seed)
            console.print(f"{name}: {len(part)} calls")


@app.command("prefixes")
def prefixes_command(
    calls: Annotated[str, typer.Argument(help="calls folder (path or s3:// URI)")],
    out: Annotated[Path, typer.Option(help="JSONL file of prefixes to write")],
    early_until: float = 0.4,
    per_stage: Annotated[int, typer.Option(help="prefixes per stage and call; 0 = every turn boundary")] = 1,
) -> None:
    """Cut calls into streaming prefixes labelled with their conversation stage."""
    policy = PrefixPolicy(early_until=early_until, per_stage=per_stage or None)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for call in track(_calls(calls), description="cutting prefixes"):
            for p in cut_prefixes(call, policy):
                row = {"prefix_id": p.prefix_id, "call_id": p.parent_id, "stage": str(p.stage), "turns": p.turns,
                       "end_s": p.end_s, "transcript": p.call.transcript()}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    console.print(f"{n} prefixes -> {out}")


@app.command("audio")
def audio_command(
    calls: Annotated[str, typer.Argument(help="calls folder (path or s3:// URI)")],
    out: Annotated[str, typer.Option(help="calls folder to write, with audio/ beside calls.jsonl")],
    limit: Annotated[int | None, typer.Option(help="synthesize only the first N calls")] = None,
) -> None:
    """Synthesize stereo 16 kHz call audio offline (espeak-ng), re-timing turns to match the audio."""
    from teleguard.data.audio import synthesize_call
    from teleguard.data.dataset import write_calls

    records = _calls(calls)[:limit]
    with _local_output(out) as folder:
        synthesized = [
            synthesize_call(call, folder / "audio" / f"{_safe(call.call_id)}.wav")
            for call in track(records, description="synthesizing")
        ]
        write_calls(folder, synthesized, title="calls with synthesized audio")
    console.print(f"{len(synthesized)} calls with audio -> {out}")


@app.command("build")
def build_command(
    splits: Annotated[str, typer.Argument(help="folder of train/dev/test calls folders (path or s3:// URI)")],
    out: Annotated[str, typer.Option(help="dataset folder to write (path or s3:// URI)")],
    modality: Annotated[str, typer.Option(help="text or audio")] = "text",
    prompts: Annotated[str | None, typer.Option(help="zh, en, or a prompt file")] = None,
    early_until: float = 0.4,
    per_stage: int = 1,
    chain_scene: Annotated[
        bool | None,
        typer.Option("--chain-scene/--no-chain-scene", help="default: when every call has a scene"),
    ] = None,
    max_transcript_chars: Annotated[
        int | None, typer.Option(help="cut transcripts in prompts (CPU budgets)")
    ] = None,
    evidence_chars: Annotated[
        int | None, typer.Option(help="longest quote of the call in reference reasoning (default 40)")
    ] = None,
    realtime_sft: Annotated[
        int, typer.Option(min=0, help="streaming prefixes per call that also become real-time SFT rows")
    ] = 1,
    eval_sets: Annotated[
        str,
        typer.Option(help="evaluation sets drawn from the test split: all, none, or names (gold,very_short)"),
    ] = "all",
    eval_set_size: Annotated[int, typer.Option(min=1, help="calls per evaluation set, at most")] = 64,
    eval_set_seed: Annotated[int, typer.Option(help="seed of the evaluation sets")] = 0,
) -> None:
    """Build the ms-swift datasets of every stage (sft, grpo, realtime) for each split, and the evaluation sets
    (docs/eval-sets.md) from the test split."""
    from teleguard.data.dataset import build_datasets
    from teleguard.data.eval_sets import EVAL_SETS_DIR, check_names

    if modality not in ("text", "audio"):
        _fail(f"unknown modality {modality!r}; choose text or audio")
    wanted = _eval_set_names(eval_sets)
    try:
        check_names(wanted)
    except ValueError as err:
        _fail(str(err))
    source = _local_input(splits)
    with _local_output(out) as folder:
        clip_maker = None
        if modality == "audio":
            from teleguard.data.audio_clips import ClipWriter

            clip_maker = ClipWriter(folder)  # clip paths relative to the dataset folder (ROOT_IMAGE_DIR)
        try:
            cards = build_datasets(
                source,
                folder,
                modality=modality,  # type: ignore[arg-type]
                prompts=prompts,
                policy=PrefixPolicy(early_until=early_until, per_stage=per_stage or None),
                clip_maker=clip_maker,
                chain_scene=chain_scene,
                max_transcript_chars=max_transcript_chars,
                evidence_chars=evidence_chars,
                realtime_sft=realtime_sft,
                eval_sets=wanted,
                eval_set_size=eval_set_size,
                eval_set_seed=eval_set_seed,
            )
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        index_file = folder / EVAL_SETS_DIR / "card.json"
        index = json.loads(index_file.read_text("utf-8")) if index_file.is_file() else {}
    for name, card in cards.items():
        console.print(f"{name}: {card['rows']}")
    for name, n in index.get("built", {}).items():
        console.print(f"evaluation set {name}: {n} calls")
    for name, why in index.get("skipped", {}).items():
        console.print(f"evaluation set {name} skipped: {why}")


def _eval_set_names(option: str) -> list[str] | None:
    """--eval-sets: "all" -> None (every set), "none" or "" -> [], else the comma-separated names."""
    if option.strip().lower() == "all":
        return None
    if option.strip().lower() in ("", "none"):
        return []
    return [name.strip() for name in option.split(",") if name.strip()]


def _safe(call_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in call_id)
