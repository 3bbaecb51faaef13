"""`teleguard pipeline ...`: compile the pipelines (SAFE-QAQ and the seed recipes), run one locally, submit one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="The Kubeflow pipelines: SAFE-QAQ and the seed recipes.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

REPO_RECIPES = Path("recipes")  # run --local without --args: recipes/<pipeline>/pipeline-cpu.yaml
ArgsFile = Annotated[
    Path | None,
    typer.Option(
        "--args", help="YAML file of pipeline arguments (run --local: recipes/<pipeline>/pipeline-cpu.yaml)"
    ),
]
PipelineName = Annotated[
    str, typer.Option(help="safe-qaq, teacher-judge, classifier-reward, distill-cascade or rm-dpo")
]
ArgItems = Annotated[
    list[str] | None, typer.Option("--arg", help="a pipeline argument, name=value (YAML value); repeatable")
]


@app.command("compile")
def compile_command(
    out: Annotated[Path, typer.Option(help="folder for the compiled files")] = Path("pipelines/compiled"),
) -> None:
    """Compile the pipeline spec (upload it in the Kubeflow UI) and its Pipeline/PipelineVersion manifests."""
    from teleguard.pipeline.cluster import compile_pipelines

    for path in compile_pipelines(out):
        console.print(f"wrote {path}")


def pipeline_or_exit(key: str) -> Any:
    from teleguard.pipeline.registry import pipeline_info

    try:
        return pipeline_info(key)
    except ValueError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


def arguments_or_exit(
    args_file: Path | None, items: list[str] | None, pipeline: str = "safe-qaq"
) -> dict[str, Any]:
    """The checked pipeline arguments, or exit 2 naming the file (or --arg) and the parameter."""
    from teleguard.pipeline.arguments import PipelineArgumentsError, load_arguments
    from teleguard.train.cli import parse_overrides

    try:
        return load_arguments(args_file, parse_overrides(items or []), pipeline)
    except PipelineArgumentsError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


@app.command("run")
def run_command(
    local: Annotated[
        bool, typer.Option("--local", help="run with KFP's local runner on this machine")
    ] = False,
    args_file: ArgsFile = None,
    arg: ArgItems = None,
    pipeline: PipelineName = "safe-qaq",
    root: Annotated[Path, typer.Option(help="local pipeline root (artifacts)")] = Path("runs/pipeline"),
    upload: Annotated[
        str | None, typer.Option(help="s3:// or minio:// prefix that gets a copy of the run's artifacts")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(help="at the end, serve the trained model and replay held-out calls through it"),
    ] = True,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="stream every step's full output (always kept in <run>/logs/<step>.log)"
        ),
    ] = False,
) -> None:
    """Run the whole pipeline locally (the main job on a machine without a cluster) and summarize it: one
    progress line per step, then the summary tables; each step's full log is kept under the run folder."""
    from teleguard.pipeline.local import PipelineRunFailed, run_local
    from teleguard.pipeline.summary import print_summary, summarize_run

    if not local:
        err_console.print("only --local runs here; `teleguard pipeline submit --host URL` runs on a cluster")
        raise typer.Exit(2)
    info = pipeline_or_exit(pipeline)
    args_file = args_file or REPO_RECIPES / pipeline / "pipeline-cpu.yaml"
    arguments = arguments_or_exit(args_file, arg, pipeline)
    try:
        run_dir = run_local(arguments, root.resolve(), upload_uri=upload, pipeline=pipeline, verbose=verbose)
    except PipelineRunFailed as failure:
        show_failure(failure, verbose=verbose)
        raise typer.Exit(1) from None
    summary = summarize_run(run_dir, info.steps(), arguments)
    print_summary(summary, title=info.title)
    if serve:
        from teleguard.pipeline.demo_serving import demo_from_run

        try:
            demo_from_run(summary, console=console)
        except RuntimeError as err:  # the server did not come up: say why, as a failed step does
            err_console.print(f"[red]the serving demo failed:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None
    if upload:
        console.print(f"artifacts uploaded to {upload.rstrip('/')}/{run_dir.name}")


def show_failure(failure: Any, *, verbose: bool = False) -> None:
    """A failed local run: which step, the end of its log, and where the whole log is."""
    if failure.step and failure.tail and not verbose:
        err_console.rule(f"the end of {failure.step}'s log", style="red")
        err_console.print("\n".join(failure.tail), markup=False, highlight=False)
        err_console.rule(style="red")
    err_console.print(f"[red]error:[/red] {failure}", highlight=False)
    if failure.log:
        err_console.print(f"full log: {failure.log}", highlight=False)
    elif failure.run_dir:
        err_console.print(f"run folder: {failure.run_dir}", highlight=False)


@app.command("submit")
def submit_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")],
    args_file: ArgsFile = None,
    arg: ArgItems = None,
    pipeline: PipelineName = "safe-qaq",
    experiment: str = "teleguard",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
) -> None:
    """Upload the compiled pipeline (or a new version of it) and start a run. Token: KF_PIPELINES_TOKEN,
    else the kubeconfig's."""
    from teleguard.pipeline.cluster import submit

    pipeline_or_exit(pipeline)
    arguments = arguments_or_exit(args_file, arg, pipeline)
    run_id = submit(host, arguments, experiment=experiment, namespace=namespace, pipeline=pipeline)
    console.print(f"run {run_id} started in experiment {experiment!r}")
