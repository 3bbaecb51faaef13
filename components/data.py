"""Data steps: build the datasets of every stage from raw call data (CPU, cached)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

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
    import json
    import shutil
    from pathlib import Path

    from teleguard.pipeline_steps import synthesize_audio_step

    if not enabled:
        shutil.copytree(text_datasets.path, datasets.path, dirs_exist_ok=True)
        Path(audio_calls.path).mkdir(parents=True, exist_ok=True)
        return json.dumps({"skipped": True})
    summary = synthesize_audio_step(
        Path(calls.path),
        Path(audio_calls.path),
        Path(datasets.path),
        limit=limit or None,
        prompts=prompts or None,
    )
    return json.dumps(summary)
