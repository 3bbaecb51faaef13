"""Data steps: build the datasets of every stage from raw call data (CPU, cached)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from teleguard.pipeline.components.images import TRAINER_IMAGE


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
    from teleguard.pipeline.artifacts import as_json, path_of
    from teleguard.pipeline.steps.data import build_data_step

    summary = build_data_step(
        data_uri,
        path_of(calls),
        path_of(datasets),
        source_format=source_format,
        prompts=prompts or None,
        max_transcript_chars=max_transcript_chars or None,
        evidence_chars=evidence_chars or None,
        split_seed=split_seed,
    )
    path_of(card).write_text((path_of(datasets) / "train" / "card.md").read_text("utf-8"), "utf-8")
    return as_json(summary)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def synthesize_audio(
    enabled: bool,
    calls: Input[Dataset],
    text_datasets: Input[Dataset],
    limit: int,
    prompts: str,
    audio_calls: Output[Dataset],
    datasets: Output[Dataset],
) -> str:
    """Synthesize call audio offline (espeak-ng) and build the audio datasets of every stage.

    Switched off, the text datasets pass through, so the steps after it always read this step's `datasets`.
    """
    from teleguard.pipeline.artifacts import as_json, path_of
    from teleguard.pipeline.steps.common import copy_tree
    from teleguard.pipeline.steps.data import synthesize_audio_step

    if not enabled:
        copy_tree(path_of(text_datasets), path_of(datasets))
        path_of(audio_calls).mkdir(parents=True, exist_ok=True)
        return as_json({"skipped": True})
    summary = synthesize_audio_step(
        path_of(calls), path_of(audio_calls), path_of(datasets), limit=limit or None, prompts=prompts or None
    )
    return as_json(summary)
