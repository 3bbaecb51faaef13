"""The pipelines teleguard compiles, runs and submits, by the key the CLI takes (`--pipeline safe-qaq`).

Each definition module (teleguard.pipeline.definitions.<module>) owns what the rest reads of it: its
`DEFINITION` (name, title, steps) and its pipeline function (named like the module). The registry only maps the
key to the module, and imports it when asked: listing the pipelines imports no KFP.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teleguard import __version__

if TYPE_CHECKING:
    from teleguard.pipeline.definitions.shared import Definition

# The compiled specs stay at the repository root, where users find them (`teleguard pipeline compile` writes them)
COMPILED_DIR = Path(__file__).resolve().parents[3] / "pipelines" / "compiled"
SPEC_FILE, MANIFEST_FILE = "safe_qaq.yaml", "safe_qaq.k8s.yaml"


@dataclass(frozen=True)
class PipelineInfo:
    """A pipeline of `PIPELINES`: everything about it comes from its definition module."""

    module: str  # under teleguard.pipeline.definitions

    def definition(self) -> Definition:
        return importlib.import_module(f"teleguard.pipeline.definitions.{self.module}").DEFINITION

    def function(self) -> Any:
        """The KFP pipeline (a GraphComponent: compile it, or call it under KFP's local runner)."""
        return getattr(importlib.import_module(f"teleguard.pipeline.definitions.{self.module}"), self.module)

    def name(self) -> str:
        return self.definition().name

    @property
    def title(self) -> str:
        return self.definition().title

    def steps(self) -> dict[str, str]:
        return dict(self.definition().steps)

    @property
    def spec_file(self) -> str:
        return f"{self.module}.yaml"

    @property
    def manifest_file(self) -> str:
        return f"{self.module}.k8s.yaml"


PIPELINES: dict[str, PipelineInfo] = {
    "safe-qaq": PipelineInfo("safe_qaq"),
    "teacher-judge": PipelineInfo("teacher_judge"),
    "classifier-reward": PipelineInfo("classifier_reward"),
    "distill-cascade": PipelineInfo("distill_cascade"),
    "rm-dpo": PipelineInfo("rm_dpo"),
}


def pipeline_info(key: str) -> PipelineInfo:
    if key not in PIPELINES:
        raise ValueError(f"unknown pipeline {key!r}; pipelines: {', '.join(PIPELINES)}")
    return PIPELINES[key]


def pipeline_version_name(key: str = "safe-qaq") -> str:
    return f"teleguard-{key}-v{__version__.replace('.', '-')}"


def task_folders(function: Any) -> list[str]:
    """The folders a local run of the compiled pipeline `function` leaves, one per container task (sub-DAGs such
    as a `dsl.If` branch are walked into, not counted): the task's component name without `comp-`."""
    spec = function.pipeline_spec
    folders: list[str] = []

    def walk(dag: Any) -> None:
        for task in dag.tasks.values():
            component = spec.components[task.component_ref.name]
            if component.HasField("dag"):
                walk(component.dag)
            else:
                folders.append(task.component_ref.name.removeprefix("comp-"))

    walk(spec.root.dag)
    return folders
