"""Pipeline arguments from a YAML file plus `name=value` overrides, checked against the pipeline's parameters.

The same file serves a local run and a cluster submission (`recipes/safe-qaq/pipeline-cpu.yaml` is the main
job's). Checking here, before anything runs, turns a misspelt name or a wrong type into an error that names
the file and the parameter instead of a failed step an hour into a run.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from teleguard.pipeline.registry import pipeline_info
from teleguard.yaml_files import read_mapping

# Parameters that name files on this machine: made absolute for a local run, whose steps run as subprocesses.
LOCAL_PATH_PARAMETERS = (
    "data_uri",
    "recipe",
    "prompts",
    "registry_uri",
    "base_model_uri",
    "teacher_model_uri",
)


class PipelineArgumentsError(ValueError):
    """An arguments file or override that does not fit the pipeline's parameters."""


def pipeline_parameters(pipeline: str = "safe-qaq") -> dict[str, inspect.Parameter]:
    """The pipeline's parameters as KFP reads them (the definition's signature: shared and its own)."""
    return dict(inspect.signature(pipeline_info(pipeline).function().pipeline_func).parameters)


def _type_fits(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_arguments(arguments: dict[str, Any], where: str, pipeline: str = "safe-qaq") -> dict[str, Any]:
    """Every name is a pipeline parameter and every value has its type; ints are widened to floats."""
    params = pipeline_parameters(pipeline)
    problems = []
    checked = {}
    for name, value in arguments.items():
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{where}: '{name}' is not a parameter of the pipeline{hint}")
            continue
        annotation = params[name].annotation
        if not _type_fits(value, annotation):
            problems.append(
                f"{where}: '{name}' must be {annotation.__name__}, got {type(value).__name__} {value!r}"
            )
            continue
        checked[name] = float(value) if annotation is float else value
    if problems:
        raise PipelineArgumentsError("\n".join(problems))
    return checked


def load_arguments(
    path: Path | None, overrides: dict[str, Any] | None = None, pipeline: str = "safe-qaq"
) -> dict[str, Any]:
    """The file's arguments (if any) with the overrides on top; both checked against `pipeline`'s parameters."""
    arguments = {}
    if path is not None:
        arguments = check_arguments(
            read_mapping(path, "pipeline arguments file", PipelineArgumentsError), str(path), pipeline
        )
    return {**arguments, **check_arguments(overrides or {}, "--arg", pipeline)}


def localize(arguments: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths made absolute, so every step finds them whatever its working folder."""
    local = dict(arguments)
    for name in LOCAL_PATH_PARAMETERS:
        value = local.get(name)
        if isinstance(value, str) and value and "://" not in value:
            local[name] = str(Path(value).resolve())
    return local
