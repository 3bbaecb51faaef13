"""`teleguard pipeline ...`: compile the SAFE-QAQ pipeline, run it locally, submit it to a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="The SAFE-QAQ Kubeflow pipeline.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

CPU_ARGUMENTS = Path("recipes/safe-qaq/pipeline-cpu.yaml")
ArgsFile = Annotated[Path | None, typer.Option("--args", help="YAML file of pipeline arguments")]
ArgItems = Annotated[
    list[str] | None, typer.Option("--arg", help="a pipeline argument, name=value (YAML value); repeatable")
]


@app.command("compile")
def compile_command(
    out: Annotated[Path, typer.Option(help="folder for the compiled files")] = Path("pipelines/compiled"),
) -> None:
    """Compile the pipeline spec (upload it in the Kubeflow UI) and its Pipeline/PipelineVersion manifests."""
    from teleguard.pipeline import compile_pipelines

    for path in compile_pipelines(out):
        console.print(f"wrote {path}")


def arguments_or_exit(args_file: Path | None, items: list[str] | None) -> dict[str, Any]:
    """The checked pipeline arguments, or exit 2 naming the file (or --arg) and the parameter."""
    from teleguard.pipeline_arguments import PipelineArgumentsError, load_arguments
    from teleguard.train.cli import parse_overrides

    try:
        return load_arguments(args_file, parse_overrides(items or []))
    except PipelineArgumentsError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


@app.command("run")
def run_command(
    local: Annotated[
        bool, typer.Option("--local", help="run with KFP's local runner on this machine")
    ] = False,
    args_file: ArgsFile = CPU_ARGUMENTS,
    arg: ArgItems = None,
    root: Annotated[Path, typer.Option(help="local pipeline root (artifacts)")] = Path("runs/pipeline"),
    upload: Annotated[
        str | None, typer.Option(help="s3:// or minio:// prefix that gets a copy of the run's artifacts")
    ] = None,
    serve: Annotated[
        bool, typer.Option(help="at the end, serve the trained model and replay held-out calls through it")
    ] = True,
) -> None:
    """Run the whole pipeline locally (the main job on a machine without a cluster) and summarize it."""
    from teleguard.pipeline import run_local
    from teleguard.pipeline_summary import print_summary, summarize_run

    if not local:
        err_console.print("only --local runs here; `teleguard pipeline submit --host URL` runs on a cluster")
        raise typer.Exit(2)
    arguments = arguments_or_exit(args_file, arg)
    run_dir = run_local(arguments, root.resolve(), upload_uri=upload)
    summary = summarize_run(run_dir)
    print_summary(summary)
    if serve:
        from teleguard.demo_serving import demo_from_run

        demo_from_run(summary, arguments, console=console)
    if upload:
        console.print(f"artifacts uploaded to {upload.rstrip('/')}/{run_dir.name}")


@app.command("submit")
def submit_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")],
    args_file: ArgsFile = None,
    arg: ArgItems = None,
    experiment: str = "teleguard",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
) -> None:
    """Upload the compiled pipeline (or a new version of it) and start a run. Token: KF_PIPELINES_TOKEN,
    else the kubeconfig's."""
    from teleguard.pipeline import submit

    run_id = submit(host, arguments_or_exit(args_file, arg), experiment=experiment, namespace=namespace)
    console.print(f"run {run_id} started in experiment {experiment!r}")
