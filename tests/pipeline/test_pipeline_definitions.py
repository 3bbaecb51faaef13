"""Every pipeline definition declares its name, title and steps the same way, and its STEPS are the tasks it
really has, upstream before downstream (issue 12: the summary read a step list one pipeline did not declare)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from teleguard.pipeline.arguments import load_arguments
from teleguard.pipeline.definitions.shared import Definition
from teleguard.pipeline.registry import PIPELINES, pipeline_info, task_folders
from tests.support.paths import REPO

RECIPES = REPO / "recipes" / "safe-qaq"


def upstream_folders(function: Any) -> dict[str, set[str]]:
    """Each task folder of the compiled pipeline with the folders it waits for (a task inside a sub-DAG, such
    as a `dsl.If` branch, also waits for what the sub-DAG waits for)."""
    spec = function.pipeline_spec
    upstream: dict[str, set[str]] = {}

    def folders_of(dag: Any, name: str) -> set[str]:
        task = dag.tasks[name]
        component = spec.components[task.component_ref.name]
        if component.HasField("dag"):
            return {f for inner in component.dag.tasks for f in folders_of(component.dag, inner)}
        return {task.component_ref.name.removeprefix("comp-")}

    def walk(dag: Any, inherited: set[str]) -> None:
        for task in dag.tasks.values():
            waits = inherited | {f for dep in task.dependent_tasks for f in folders_of(dag, dep)}
            component = spec.components[task.component_ref.name]
            if component.HasField("dag"):
                walk(component.dag, waits)
            else:
                upstream[task.component_ref.name.removeprefix("comp-")] = waits

    walk(spec.root.dag, set())
    return upstream


@pytest.mark.parametrize("key", list(PIPELINES))
def test_steps_are_the_pipelines_tasks_in_running_order(key: str) -> None:
    info = pipeline_info(key)
    assert isinstance(info.definition(), Definition), info.module
    assert info.name() == f"teleguard-{key}" and info.title.startswith("teleguard ")
    steps = info.steps()
    assert all(isinstance(what, str) and what for what in steps.values()), "every step says what it is for"
    function = info.function()
    folders = task_folders(function)
    assert len(folders) == len(set(folders))
    assert set(steps) == set(folders), (
        f"teleguard/pipeline/definitions/{info.module}.py steps: missing {sorted(set(folders) - set(steps))}, "
        f"not a task {sorted(set(steps) - set(folders))}"
    )
    order = list(steps)
    for step, waits in upstream_folders(function).items():
        late = [w for w in waits if order.index(w) > order.index(step)]
        assert not late, f"{key}: STEPS lists {step!r} before its upstream {late}"


def test_safe_qaq_steps_include_the_gated_registration() -> None:
    steps = list(pipeline_info("safe-qaq").steps())
    assert steps[0] == "build-data" and steps[-2:] == ["quality-gate", "register-model"]


def test_an_unknown_pipeline_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown pipeline 'nope'; pipelines: safe-qaq, teacher-judge"):
        pipeline_info("nope")


def test_ci_arguments_are_the_cpu_arguments_at_ci_size() -> None:
    """pipeline-ci.yaml (the main command's CI run) differs from the main job's file only in recipe overrides."""
    cpu = yaml.safe_load((RECIPES / "pipeline-cpu.yaml").read_text("utf-8"))
    ci = yaml.safe_load((RECIPES / "pipeline-ci.yaml").read_text("utf-8"))
    assert {**ci, "recipe_overrides": cpu["recipe_overrides"]} == cpu, (
        "recipes/safe-qaq/pipeline-ci.yaml must be pipeline-cpu.yaml with CI-sized recipe_overrides: update it"
    )
    overrides = load_arguments(RECIPES / "pipeline-ci.yaml")["recipe_overrides"]
    assert overrides == ci["recipe_overrides"] and overrides["stages.sft.max_steps"] <= 10
