"""The one adapter between a KFP component and the step functions: artifacts in as folders, metrics out as JSON.

Every component calls into teleguard through here, so the step functions (teleguard.pipeline.steps) know
nothing of KFP: they take and write folders and return plain dicts. `stage_step` is the adapter of every
training-stage component (warm start, the GRPO stages, RSFT, export and the seed recipes' stages): the stage
runs in the step's own pod, or as a multi-node TrainJob when `nodes` asks for more than one node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Artifact(Protocol):
    """What a component gets for an input or output artifact (kfp.dsl.Dataset, Model, ...)."""

    path: str  # the local folder (a mount or download of `uri`)
    uri: str  # where the artifact lives: an s3:// or minio:// URI on a cluster, a local path in a local run


def path_of(artifact: Artifact) -> Path:
    return Path(artifact.path)


def paths_of(artifacts: Mapping[str, Artifact] | None) -> dict[str, Path]:
    return {name: path_of(a) for name, a in (artifacts or {}).items()}


def as_json(value: Any) -> str:
    """A step's metrics as the component's string output (what the run summary and the gate read)."""
    return json.dumps(value, default=str)


@dataclass(frozen=True)
class Nodes:
    """Where a GRPO-type stage trains: `num_nodes` > 1 runs it as a TrainJob on that many GPU nodes."""

    num_nodes: int
    image: str
    gpu_type: str
    gpus_per_node: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]


def stage_step(
    stage: str,
    enabled: bool,
    recipe: str,
    overrides: dict[str, Any],
    datasets: Artifact,
    start: Artifact,
    model: Artifact,
    *,
    selection: Artifact | None = None,
    inputs: Mapping[str, Artifact] | None = None,
    side_models: Mapping[str, Artifact] | None = None,
    nodes: Nodes | None = None,
) -> str:
    """One training stage from a component (switched off: the start model passes through); the metrics as JSON.

    `selection`: the selection step's output (RSFT trains on it); `inputs` ({"sample": ...}): earlier steps'
    outputs the stage reads; `side_models` ({"rm": ..., "classifier": ...}): the side-stage models it uses."""
    from teleguard.pipeline.steps.training import train_stage_step, trainjob_stage_step

    if enabled and nodes is not None and nodes.num_nodes > 1:
        from teleguard.train.trainjob import TrainJobSettings, current_namespace

        settings = TrainJobSettings(
            namespace=current_namespace(), image=nodes.image, num_nodes=nodes.num_nodes, gpu_type=nodes.gpu_type,
            gpus_per_node=nodes.gpus_per_node, node_selector=nodes.node_selector, tolerations=nodes.tolerations,
        )  # fmt: skip
        # the nodes read and write the artifacts' URIs (S3/MinIO), not the step pod's local copies
        metrics = trainjob_stage_step(
            stage, recipe, overrides, datasets_uri=datasets.uri, start_model_uri=start.uri, output_uri=model.uri,
            out_model=path_of(model), settings=settings,
        )  # fmt: skip
        return as_json(metrics)
    metrics = train_stage_step(
        stage, enabled, recipe, overrides, path_of(datasets), path_of(start), path_of(model),
        selection=path_of(selection) if selection is not None else None, inputs=paths_of(inputs),
        side_models=paths_of(side_models),
    )  # fmt: skip
    return as_json(metrics)
