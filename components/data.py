"""Data steps: build the datasets of every stage from raw call data (CPU, cached)."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from teleguard.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def build_data(
    data_uri: str,
    source_format: str,
    prompts: str,
    max_transcript_chars: int,
    evidence_chars: int,
    split_seed: int,
    calls: Output[Dataset],
    datasets: Output[Dataset],
    card: Output[Markdown],
) -> str:
    """Ingest the call data, split it by call, and build the text datasets of every stage."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import build_data_step

    summary = build_data_step(
        data_uri,
        Path(calls.path),
        Path(datasets.path),
        source_format=source_format,
        prompts=prompts or None,
        max_transcript_chars=max_transcript_chars or None,
        evidence_chars=evidence_chars or None,
        split_seed=split_seed,
    )
    Path(card.path).write_text((Path(datasets.path) / "train" / "card.md").read_text("utf-8"), "utf-8")
    return json.dumps(summary)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def synthesize_audio(
    calls: dsl.Input[Dataset],
    limit: int,
    prompts: str,
    audio_calls: Output[Dataset],
    audio_datasets: Output[Dataset],
) -> str:
    """Synthesize call audio offline (espeak-ng) and build the audio datasets of every stage."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import synthesize_audio_step

    summary = synthesize_audio_step(
        Path(calls.path), Path(audio_calls.path), Path(audio_datasets.path), limit=limit or None,
        prompts=prompts or None,
    )  # fmt: skip
    return json.dumps(summary)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def text_datasets(datasets: dsl.Input[Dataset], selected: Output[Dataset]):
    """The text datasets, when the pipeline trains on transcripts (the other branch of the audio switch)."""
    import shutil

    shutil.copytree(datasets.path, selected.path, dirs_exist_ok=True)
