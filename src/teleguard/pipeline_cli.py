"""`teleguard pipeline ...`: compile the SAFE-QAQ pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="The SAFE-QAQ Kubeflow pipeline.", no_args_is_help=True)
console = Console()


@app.command("compile")
def compile_command(
    out: Annotated[Path, typer.Option(help="folder for the compiled files")] = Path("pipelines/compiled"),
) -> None:
    """Compile the pipeline spec (upload it in the Kubeflow UI) and its Pipeline/PipelineVersion manifests."""
    from teleguard.pipeline import compile_pipelines

    for path in compile_pipelines(out):
        console.print(f"wrote {path}")


def _arguments(items: list[str]) -> dict[str, object]:
    from teleguard.train.cli import parse_overrides

    return parse_overrides(items)


@app.command("run")
def run_command(
    local: Annotated[
        bool, typer.Option("--local", help="run with KFP's local runner on this machine")
    ] = False,
    recipe: Annotated[str, typer.Option(help="recipe file")] = "recipes/safe-qaq/tiny-cpu.yaml",
    data: Annotated[
        str, typer.Option(help="call data folder or s3:// URI")
    ] = "../shared/data/teleantifraud-dialogues",
    root: Annotated[Path, typer.Option(help="local pipeline root (artifacts)")] = Path("runs/pipeline"),
    arg: Annotated[list[str] | None, typer.Option("--arg", help="pipeline argument name=value")] = None,
) -> None:
    """Run the whole pipeline locally (the main job on a machine without a cluster)."""
    from teleguard.pipeline import local_arguments, run_local

    if not local:
        console.print("only --local runs here; use `teleguard pipeline submit --host URL` for a cluster")
        raise typer.Exit(2)
    arguments = local_arguments(recipe, data, str(root / "registry"), **_arguments(arg or []))
    run_local(arguments, root.resolve())
    console.print(f"pipeline finished; artifacts under {root}")


@app.command("submit")
def submit_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")],
    arg: Annotated[list[str] | None, typer.Option("--arg", help="pipeline argument name=value")] = None,
    experiment: str = "teleguard",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
) -> None:
    """Upload the compiled pipeline (or a new version of it) and start a run. Token: KF_PIPELINES_TOKEN."""
    from teleguard.pipeline import submit

    run_id = submit(host, _arguments(arg or []), experiment=experiment, namespace=namespace)
    console.print(f"run {run_id} started in experiment {experiment!r}")
