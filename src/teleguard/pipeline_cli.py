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
