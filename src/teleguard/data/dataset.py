"""Folders of calls and of ms-swift datasets: reading, writing and building them for every stage.

A calls folder holds `calls.jsonl` (teleguard's record format) and a dataset card; a splits folder holds one
calls folder per split (train/dev/test). `build_datasets` turns a splits folder into, per split:

    <split>/sft.jsonl       warm-start SFT: whole calls, offline prompts, assistant targets for every round;
                            then, per call, real-time rows (`realtime_sft` of its streaming prefixes, the prompts
                            the detector sends at its policy points; column `mode`: offline / realtime)
    <split>/grpo.jsonl      stage 1 / 2a / 2c: whole calls, offline prompts, prompt-only rows with ground truth
    <split>/realtime.jsonl  stage 3: streaming prefixes labelled early_stage / late_stage / complete
    <split>/card.json       what the split holds

in one modality (text: the transcript in the prompt; audio: the audio in `audios`, clipped to <= 30 s).
Every target and reference answer reasons from its own call (teleguard.data.evidence); the card reports the
distinct-reasoning rate and how often the quoted evidence is in the call (`reasoning`).
From the test split it also builds the evaluation sets (teleguard.data.eval_sets, docs/eval-sets.md):

    eval_sets/<name>/grpo.jsonl  whole-call rows of one set, built like the test split's grpo.jsonl
    eval_sets/<name>/card.json   what the set holds and how it was drawn
    eval_sets/card.json          which sets were built, and which were skipped and why
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import track

from teleguard.contract import Mode, Stage, load_prompts, parse_output
from teleguard.contract.prompts import write_prompt_set
from teleguard.data.card import call_card, write_card
from teleguard.data.eval_sets import (
    AUDIO_SETS,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    EVAL_SETS,
    EVAL_SETS_DIR,
    check_names,
    make_eval_sets,
)
from teleguard.data.evidence import DEFAULT_QUOTE_CHARS, RationaleWriter, reasoning_figures
from teleguard.data.ingest import ingest
from teleguard.data.prefixes import Prefix, PrefixPolicy, cut_prefixes
from teleguard.data.records import CallRecord
from teleguard.data.rounds import Modality, RowBuilder, Sample, sample_of_call
from teleguard.data.splits import SPLITS
from teleguard.data.timing import SpeechRate, estimate_times

CALLS_FILE = "calls.jsonl"
REALTIME_SFT_PREFIXES = 1  # real-time SFT rows per call by default: CPU warm starts stay fast
PROMPTS_FILE = "prompts.yaml"  # in a datasets folder: the prompt set its rows were built with

# (call, end second or None for the whole call, cut number) -> audio clip paths
ClipMaker = Callable[[CallRecord, float | None, int], Sequence[str]]


def _is_uri(path: str) -> bool:
    return "://" in path


def write_calls(folder: Path, calls: Iterable[CallRecord], *, title: str = "calls", **card: Any) -> Path:
    """calls.jsonl and a card; local audio paths are stored relative to the folder, so it can move."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = list(calls)
    path = folder / CALLS_FILE
    with path.open("w", encoding="utf-8") as f:
        for call in calls:
            if call.audio and not _is_uri(call.audio):
                call = call.model_copy(
                    update={"audio": os.path.relpath(Path(call.audio).resolve(), folder.resolve())}
                )
            f.write(call.model_dump_json(exclude_defaults=True) + "\n")
    write_card(folder, call_card(calls, **card), title)
    return path


def read_calls(folder: Path) -> list[CallRecord]:
    """Calls from a folder (or a calls.jsonl file), with local audio paths made absolute."""
    path = folder / CALLS_FILE if folder.is_dir() else folder
    calls, _ = ingest([path], "teleguard", on_error="fail")
    return [
        c.model_copy(update={"audio": str((path.parent / c.audio).resolve())})
        if c.audio and not _is_uri(c.audio)
        else c
        for c in calls
    ]


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def build_split(
    calls: list[CallRecord],
    out: Path,
    *,
    modality: Modality = "text",
    prompts: str | Path | None = None,
    policy: PrefixPolicy | None = None,
    rate: SpeechRate | None = None,
    clip_maker: ClipMaker | None = None,
    progress: str | None = None,
    chain_scene: bool | None = None,
    max_transcript_chars: int | None = None,
    evidence_chars: int | None = None,
    realtime_sft: int = REALTIME_SFT_PREFIXES,
) -> dict[str, Any]:
    """The three datasets of one split; returns its card.

    `chain_scene=None` chains the is_fraud round onto the scene round only when every call has a scene label
    (see RowBuilder: otherwise the conversation's shape would leak the label). `realtime_sft`: how many of a
    call's streaming prefixes (the proper ones first: early and late stage) also become real-time SFT rows in
    sft.jsonl (0: none). `evidence_chars`: the longest quote of the call in reference reasoning (default 40).
    """
    if modality == "audio" and clip_maker is None:
        raise ValueError("the audio modality needs a clip maker (teleguard.data.audio)")
    if realtime_sft < 0:
        raise ValueError(f"realtime_sft must be 0 or more, got {realtime_sft}")
    if chain_scene is None:
        chain_scene = bool(calls) and all(c.labels.scene is not None for c in calls)
    prompt_set = load_prompts(prompts)
    knobs = {
        "chain_scene": chain_scene,
        "max_transcript_chars": max_transcript_chars,
        "evidence_chars": evidence_chars,
    }
    # one writer for both builders: no two targets or reference answers of the split share a think
    writer = RationaleWriter(prompt_set, quote_chars=evidence_chars or DEFAULT_QUOTE_CHARS)
    offline = RowBuilder(prompt_set, Mode.OFFLINE, modality, **knobs, writer=writer)
    realtime = RowBuilder(prompt_set, Mode.REALTIME, modality, **knobs, writer=writer)
    out.mkdir(parents=True, exist_ok=True)
    sft, grpo, live = [], [], []
    targets: list[tuple[str, str]] = []  # (the call's transcript, one SFT target) for the card's figures
    shown: list[str] = []  # the transcript as the prompt shows it, per target
    stages: Counter[str] = Counter()
    sft_stages: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    nulls = 0

    def add_sft(rows: list[dict[str, Any]], sample: Sample) -> None:
        sft.extend(rows)
        transcript = sample.call.transcript()
        window = transcript[:max_transcript_chars] if modality == "text" else transcript
        for row in rows:
            for message in row["messages"]:
                if message["role"] == "assistant":
                    targets.append((transcript, message["content"]))
                    shown.append(window)

    items = track(calls, description=progress) if progress else calls
    for call in items:
        call = estimate_times(call, rate)
        clips = clip_maker(call, None, len(call.turns)) if clip_maker else ()
        whole = sample_of_call(call, clips)
        add_sft(offline.sft_rows(whole), whole)
        grpo += offline.grpo_rows(whole)
        if not call.turns:
            continue  # audio-only calls have no turn boundaries to cut at
        prefixes = cut_prefixes(call, policy, rate)
        for_sft = {p.turns for p in realtime_sft_prefixes(prefixes, realtime_sft)}
        for prefix in prefixes:
            cut = None if prefix.turns == len(call.turns) else prefix.end_s
            sample = Sample(
                call=prefix.call,
                call_id=prefix.parent_id,
                stage=prefix.stage,
                audio_idx=prefix.turns,
                audio_length=prefix.end_s,
                clips=clip_maker(call, cut, prefix.turns) if clip_maker else (),
            )
            rows = realtime.grpo_rows(sample)
            live += rows
            stages.update(r["conversation_stage"] for r in rows)
            if prefix.turns in for_sft:
                before = len(targets)
                add_sft(realtime.sft_rows(sample), sample)
                sft_stages[str(prefix.stage)] += 1
                nulls += sum(parse_output(a).label is None for _, a in targets[before:])
    tasks.update(r["task"] for r in grpo)
    counts = {
        "sft_rows": write_rows(out / "sft.jsonl", sft),  # offline and real-time rows together
        "sft_realtime_rows": sum(r["mode"] == Mode.REALTIME for r in sft),
        "grpo_rows": write_rows(out / "grpo.jsonl", grpo),
        "realtime_rows": write_rows(out / "realtime.jsonl", live),
    }
    figures = reasoning_figures(targets, windows=shown)
    card = call_card(
        calls,
        modality=modality,
        language=prompt_set.language,
        **knobs,
        realtime_sft=realtime_sft,
        rows=counts,
        grpo_rows_per_task=dict(tasks),
        realtime_rows_per_stage=dict(stages),
        sft_realtime_prefixes_per_stage=dict(sft_stages),
        sft_realtime_null_targets=nulls,
        reasoning=figures,
    )
    write_card(out, card, f"{out.name} ({modality})")
    return card


def realtime_sft_prefixes(prefixes: list[Prefix], n: int) -> list[Prefix]:
    """Which of a call's prefixes become real-time SFT rows: up to `n`, the proper prefixes (early, late) before
    the complete call; when only some fit, a choice seeded by the call id, so calls cover both stages."""
    proper = [p for p in prefixes if p.stage != Stage.COMPLETE]
    complete = [p for p in prefixes if p.stage == Stage.COMPLETE]
    if n >= len(proper):
        return (proper + complete)[:n]
    rng = random.Random(f"realtime-sft:{prefixes[0].parent_id}") if proper else None
    return sorted(rng.sample(proper, n), key=lambda p: p.turns) if rng else []


def build_eval_sets(
    calls: list[CallRecord],
    out: Path,
    *,
    names: Sequence[str] | None = None,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    modality: Modality = "text",
    prompts: str | Path | None = None,
    chain_scene: bool = False,
    rate: SpeechRate | None = None,
    clip_maker: ClipMaker | None = None,
    max_transcript_chars: int | None = None,
    evidence_chars: int | None = None,
) -> dict[str, Any]:
    """The evaluation sets drawn from `calls` (the test split) as `<out>/<name>/grpo.jsonl` + card.

    Rows are built exactly as the test split's whole-call rows (same prompts, modality and knobs: pass the test
    split's `chain_scene`), so a set's numbers compare with the split's. An audio dataset holds only the sets
    whose calls still match their audio (`AUDIO_SETS`); the others would need new audio and are skipped, with
    the reason in `<out>/card.json`. Registry sets not built this time are removed from `out`, so a rebuild
    leaves none stale. Returns the index: {"built": {name: calls}, "skipped": {name: reason}, ...}.
    """
    wanted = check_names(names)
    skipped = {}
    if modality == "audio":
        skipped = {n: "needs new audio: its transcripts no longer match the call audio" for n in wanted}
        wanted = [n for n in wanted if n in AUDIO_SETS]
        skipped = {n: why for n, why in skipped.items() if n not in wanted}
    builder = RowBuilder(
        load_prompts(prompts),
        Mode.OFFLINE,
        modality,
        chain_scene=chain_scene,
        max_transcript_chars=max_transcript_chars,
        evidence_chars=evidence_chars,
    )
    built = {}
    for name, members in make_eval_sets(calls, wanted, seed=seed, limit=size).items():
        rows = []
        for call in members:
            call = estimate_times(call, rate)
            clips: Sequence[str] = ()
            if clip_maker is not None:
                # a cut call (very_short) is the first seconds of its audio; a whole call is all of it
                cut = call.turns[-1].end if call.meta.get("whole_turns") else None
                clips = clip_maker(call, cut, len(call.turns))
            rows += builder.grpo_rows(sample_of_call(call, clips))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        card = call_card(
            members,
            eval_set=name,
            description=" ".join((EVAL_SETS[name].__doc__ or "").split("\n\n")[0].split()),
            seed=seed,
            size_limit=size,
            source_calls=len(calls),
            modality=modality,
            chain_scene=chain_scene,
            rows={"grpo_rows": write_rows(folder / "grpo.jsonl", rows)},
            grpo_rows_per_task=dict(Counter(r["task"] for r in rows)),
        )
        write_card(folder, card, f"evaluation set {name} ({modality})")
        built[name] = len(members)
    for stale in set(EVAL_SETS) - set(built):  # a rebuild with fewer sets must not leave old ones to evaluate
        shutil.rmtree(out / stale, ignore_errors=True)
    index = {"seed": seed, "size_limit": size, "modality": modality, "built": built, "skipped": skipped}
    out.mkdir(parents=True, exist_ok=True)
    write_card(out, index, "evaluation sets")
    return index


def build_datasets(
    splits_dir: Path,
    out: Path,
    *,
    eval_sets: Sequence[str] | None = None,
    eval_set_size: int = DEFAULT_SIZE,
    eval_set_seed: int = DEFAULT_SEED,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Build every split found in `splits_dir` (train/dev/test calls folders), and from the test split the
    evaluation sets `eval_sets` (None: all of them; empty: none) of up to `eval_set_size` calls each."""
    present = [name for name in SPLITS if (splits_dir / name / CALLS_FILE).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{splits_dir}: no split folders with {CALLS_FILE} (run `teleguard data split`)"
        )
    names = check_names(eval_sets)  # a misspelt set fails before any split is built
    out.mkdir(parents=True, exist_ok=True)
    # the whole prompt set the rows were built with: the export step puts it into the serving profile
    write_prompt_set(out / PROMPTS_FILE, load_prompts(options.get("prompts")))
    cards = {}
    for name in present:
        calls = read_calls(splits_dir / name)
        cards[name] = build_split(calls, out / name, progress=f"building {name}", **options)
        if name == "test":
            knobs = ("modality", "prompts", "rate", "clip_maker", "max_transcript_chars", "evidence_chars")
            build_eval_sets(
                calls,
                out / EVAL_SETS_DIR,
                names=names,
                size=eval_set_size,
                seed=eval_set_seed,
                chain_scene=cards[name]["chain_scene"],
                **{k: options[k] for k in knobs if k in options},
            )
    return cards
