"""`teleguard evaluate --config recipe.yaml`: evaluate the models of a recipe's stages and compare them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from teleguard.train.cli import recipe_or_exit

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def evaluate(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe file")],
    stages: Annotated[
        str, typer.Option(help="comma-separated stages to evaluate; 'base' is the start model")
    ] = "",
    out: Annotated[Path | None, typer.Option(help="report folder (default: <output_dir>/evaluation)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a recipe field")] = None,
) -> None:
    """Greedy predictions on the held-out split for each stage's model; metrics JSON and a Markdown/HTML report."""
    from teleguard.engines import recipe_engine
    from teleguard.evaluate.run import evaluate_models, read_eval_rows, read_eval_sets
    from teleguard.train.manifest import read_manifest
    from teleguard.train.stages import Runner

    recipe = recipe_or_exit(config, set_)
    runner = Runner(recipe, log=lambda line: console.print(line, highlight=False))
    wanted = [s.strip() for s in stages.split(",") if s.strip()] or [
        s for s in recipe.enabled() if s not in ("sample", "export")
    ]
    models: dict[str, Path] = {}
    for name in wanted:
        if name == "base":
            models[name] = runner.start_model(recipe.enabled()[0])
            continue
        manifest = read_manifest(runner.folder(name))
        if manifest is None:
            err_console.print(
                f"[red]error:[/red] stage {name!r} has not finished: run `teleguard train {name}` first"
            )
            raise typer.Exit(1)
        models[name] = runner.folder(name) / manifest["model"]
    e = recipe.evaluate
    datasets = runner.datasets()

    def engine_for(path: Path):
        return lambda: recipe_engine(recipe, path, datasets, kind=e.engine, batch_size=e.batch_size)

    rows = read_eval_rows(datasets / recipe.data.eval_split, realtime=e.realtime, limit=e.limit)
    out_dir = out or runner.root / "evaluation"
    results = evaluate_models(
        {name: engine_for(path) for name, path in models.items()},
        rows,
        out_dir,
        max_tokens=e.max_tokens,
        batch_size=e.batch_size,
        alert_threshold=e.alert_threshold,
        title=f"{recipe.name}: evaluation on {recipe.data.eval_split}",
        eval_sets=read_eval_sets(datasets, limit=e.limit) if e.eval_sets else {},
    )
    table = Table("stage", "fraud acc", "fraud macro F1", "well-formed", "think length", title=str(out_dir))
    for name, r in results.items():
        fraud = r.get("fraud", {})
        table.add_row(
            name,
            f"{fraud.get('accuracy', 0):.3f}",
            f"{fraud.get('macro_f1', 0):.3f}",
            f"{r['well_formed_rate']:.3f}",
            f"{r['mean_think_length']:.1f}",
        )
    console.print(table)
