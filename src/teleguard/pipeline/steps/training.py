"""Training steps: the start model, one training stage (in the step's pod or as a multi-node TrainJob),
rejection sampling and selection, and the distillation teacher."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teleguard.pipeline.steps.common import copy_tree, step_recipe

if TYPE_CHECKING:
    from teleguard.train.trainjob import TrainJobRunner, TrainJobSettings


def start_model_step(
    recipe: str, overrides: dict[str, Any], base_model_uri: str, datasets: Path, out_model: Path
) -> None:
    """The pipeline's first model: `base_model_uri`, or the recipe's model (a tiny one is built if so configured,
    its tokenizer trained on the datasets)."""
    from teleguard.train.stages import Runner

    with tempfile.TemporaryDirectory(prefix="teleguard-base-") as tmp:
        paths = {"output_dir": tmp, "datasets": str(datasets)}
        cfg = step_recipe(recipe, overrides, model_path=base_model_uri or None, **paths)
        if cfg.model.build_tiny is not None and not base_model_uri and "://" not in cfg.model.path:
            cfg = step_recipe(recipe, overrides, model_path=str(Path(tmp) / "base"), **paths)
        copy_tree(Runner(cfg, log=print).start_model(cfg.enabled()[0]), out_model)


def train_stage_step(
    stage: str,
    enabled: bool,
    recipe: str,
    overrides: dict[str, Any],
    datasets: Path,
    start_model: Path,
    out_model: Path,
    *,
    selection: Path | None = None,
    inputs: dict[str, Path] | None = None,
    side_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Run one training stage (or pass the model through when switched off); its model goes to `out_model`.

    `inputs` ({"sample": folder}) are earlier steps' outputs the stage reads from its run folder; `side_models`
    ({"rm": folder, "classifier": folder}) the side-stage models it uses."""
    if not enabled:
        copy_tree(start_model, out_model)
        return {"skipped": True}
    from teleguard.train.stages import Runner

    with tempfile.TemporaryDirectory(prefix=f"teleguard-{stage}-") as tmp:
        cfg = step_recipe(
            recipe, {**overrides, f"stages.{stage}.enabled": True}, datasets=str(datasets), output_dir=tmp
        )
        if selection is not None:  # RSFT trains on what the selection step kept
            copy_tree(selection, Path(tmp) / "sample")
        for name, folder in (inputs or {}).items():
            copy_tree(folder, Path(tmp) / name)
        result = Runner(cfg, log=print, side_models=side_models).run(stage, start_model=start_model)
        copy_tree(result.model, out_model)
        (out_model / "stage-manifest.json").write_text(
            json.dumps(result.manifest, indent=2, default=str), "utf-8"
        )
        return result.manifest.get("metrics", {})


def trainjob_stage_step(
    stage: str,
    recipe: str,
    overrides: dict[str, Any],
    *,
    datasets_uri: str,
    start_model_uri: str,
    output_uri: str,
    out_model: Path,
    settings: TrainJobSettings,
    runner: TrainJobRunner | None = None,
) -> dict[str, Any]:
    """Run one stage as a multi-node TrainJob and put the model node 0 uploaded into `out_model`.

    The URIs are the step's artifact URIs: the pipeline root must be in S3/MinIO so every node can read them.
    """
    from teleguard.storage import get_dir
    from teleguard.train.manifest import read_manifest
    from teleguard.train.trainjob import TrainJobRunner, stage_command, trainjob_manifest

    local = [u for u in (datasets_uri, start_model_uri, output_uri) if "://" not in u]
    if local:
        raise ValueError(
            f"a stage on {settings.num_nodes} nodes reads and writes its artifacts in S3/MinIO, but {local[0]} is "
            "a local path: set the pipeline root to an s3:// or minio:// URI (manifests/kfp-launcher-minio.yaml)"
        )
    output_dir = f"{output_uri.rstrip('/')}-trainjob"
    step_recipe(
        recipe, overrides, datasets=datasets_uri, output_dir=output_dir
    )  # fail here, not on the nodes
    name = f"teleguard-{stage}-{hashlib.sha256(output_uri.encode()).hexdigest()[:10]}"
    command = stage_command(
        stage, recipe, overrides, datasets=datasets_uri, start_model=start_model_uri, output_dir=output_dir
    )
    (runner or TrainJobRunner()).run(trainjob_manifest(name, command, settings), settings)
    with tempfile.TemporaryDirectory(prefix=f"teleguard-{stage}-") as tmp:
        get_dir(f"{output_dir}/{stage}", tmp)  # verified against the manifest node 0 wrote
        manifest = read_manifest(Path(tmp))
        if manifest is None:
            raise RuntimeError(f"{output_dir}/{stage}: the TrainJob finished without a stage manifest")
        copy_tree(Path(tmp) / manifest["model"], out_model)
        (out_model / "stage-manifest.json").write_text(json.dumps(manifest, indent=2, default=str), "utf-8")
    return {**manifest.get("metrics", {}), "trainjob": name, "nodes": settings.num_nodes}


def sample_step(
    enabled: bool, recipe: str, overrides: dict[str, Any], datasets: Path, model: Path, out_samples: Path
) -> int:
    """Stage 2a, first half: N samples per training prompt; writes rows with their samples. Switched off (the
    stage that trains on them is), it writes no rows and loads no model."""
    from teleguard.train.sampling import SAMPLES_FILE, sample_recipe

    if not enabled:
        out_samples.mkdir(parents=True, exist_ok=True)
        (out_samples / SAMPLES_FILE).write_text("", "utf-8")
        print("rejection sampling: off (its stage is switched off)")
        return 0
    _, rows = sample_recipe(
        step_recipe(recipe, overrides, datasets=str(datasets)), model, datasets, out_samples
    )
    return rows


def select_step(samples: Path, out_selection: Path) -> dict[str, Any]:
    """Stage 2a, second half: keep the shortest correct sample of each prompt; report the unsolved ones."""
    from teleguard.train.sampling import select_samples

    return select_samples(samples, out_selection)


def teacher_model_step(
    recipe: str, overrides: dict[str, Any], teacher_model_uri: str, datasets: Path, out_model: Path
) -> None:
    """The distillation teacher: a model URI, or the recipe's teacher (built tiny when so configured)."""
    from teleguard.storage import local_copy
    from teleguard.train.stages import Runner

    if teacher_model_uri:
        source = local_copy(teacher_model_uri) if "://" in teacher_model_uri else Path(teacher_model_uri)
        copy_tree(source, out_model)
        return
    with tempfile.TemporaryDirectory(prefix="teleguard-teacher-") as tmp:
        cfg = step_recipe(
            recipe, {**overrides, "stages.distill.teacher.path": str(Path(tmp) / "teacher")},
            datasets=str(datasets), output_dir=tmp,
        )  # fmt: skip
        copy_tree(Runner(cfg, log=print).teacher_model(), out_model)
