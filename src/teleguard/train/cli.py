"""`teleguard train STAGE --config recipe.yaml`: run one SAFE-QAQ stage (or all) from a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from teleguard.train.config import STAGES, RecipeError, load_recipe

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs; values are read as YAML scalars (2, 3e-5, true, null, [a, b])."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected key.path=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def recipe_or_exit(config: Path, set_: list[str] | None):
    """The validated recipe, or exit 2 with the file and the fields that are wrong."""
    try:
        return load_recipe(config, parse_overrides(set_ or []))
    except RecipeError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


def train(
    stage: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGES)}, or all")],
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe file")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe field: stages.grpo.max_steps=2")
    ] = None,
    force: Annotated[bool, typer.Option(help="run again even if the stage already finished")] = False,
    start_model: Annotated[
        str | None,
        typer.Option(help="start this one stage from a model folder or s3:// URI instead of the chain's"),
    ] = None,
) -> None:
    """Run a SAFE-QAQ stage through ms-swift; each stage starts from the previous enabled stage's model."""
    from teleguard.train.stages import Runner
    from teleguard.train.swift import SwiftError

    recipe = recipe_or_exit(config, set_)
    if stage != "all" and stage not in STAGES:
        err_console.print(f"[red]error:[/red] unknown stage {stage!r}; stages: {', '.join(STAGES)}, all")
        raise typer.Exit(2)
    if start_model and stage == "all":
        err_console.print("[red]error:[/red] --start-model needs one stage, not all")
        raise typer.Exit(2)
    runner = Runner(recipe, force=force, log=lambda line: console.print(line, highlight=False))
    try:
        if start_model:
            results = [runner.run(stage, start_model=start_model)]
        else:
            results = runner.run_all(None if stage == "all" else [stage])
    except (SwiftError, FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    for result in results:
        console.print(f"{result.stage}: {result.model}" + (" (already done)" if result.skipped else ""))
