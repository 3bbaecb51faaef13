"""Running a pipeline with KFP's local runner: the whole pipeline on this machine (the main job), no cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teleguard.pipeline.registry import pipeline_info


def without_retries(function: Any) -> Any:
    """A copy of a pipeline without its retry policies. KFP's local runner honours them, but a local run has no
    preempted node to wait for: a failure should fail at once, not after minutes of backoff."""
    import copy

    local = copy.deepcopy(function)
    spec = local.pipeline_spec
    for dag in [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
    return local


class PipelineRunFailed(RuntimeError):
    """A local run that stopped at a failed step: the step, its log file, and the last lines of its log."""

    def __init__(
        self, message: str, *, step: str | None, log: Path | None, tail: list[str], run_dir: Path | None
    ) -> None:
        super().__init__(message)
        self.step, self.log, self.tail, self.run_dir = step, log, tail, run_dir


def run_local(
    arguments: dict[str, object],
    pipeline_root: Path,
    upload_uri: str | None = None,
    *,
    pipeline: str = "safe-qaq",
    verbose: bool = False,
) -> Path:
    """Run the whole pipeline with KFP's local runner in this Python environment (no Docker, no cluster).

    Kubernetes settings (GPU pool, shm, tolerations) are ignored locally. Returns the run's folder under
    pipeline_root, which holds one folder of artifacts per step and `logs/<step>.log`, each step's full output.
    The console shows one progress line per step (`verbose`: the runner's whole stream instead). A failed step
    raises PipelineRunFailed with the tail of its log. KFP's local runner keeps artifacts on local disk only, so
    `upload_uri` (s3:// or minio://) gets a checksummed copy of the run's folder, as a cluster's pipeline root
    in MinIO would.
    """
    from kfp import local

    from teleguard.pipeline.arguments import localize
    from teleguard.pipeline.progress import ANSI, RunWatch

    info = pipeline_info(pipeline)
    function = without_retries(info.function())
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in pipeline_root.iterdir()}
    prefix = f"{info.name()}-"  # KFP names a run's folder <pipeline name>-<timestamp>

    def run_dir() -> Path | None:
        new = [p for p in pipeline_root.iterdir() if p.name not in before and p.name.startswith(prefix)]
        return max(new) if new else None

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    watch = RunWatch(info.steps(), run_dir, verbose=verbose)
    try:
        with watch:
            function(**localize(arguments))
    except RuntimeError as err:
        step = watch.failed_step
        log = watch.logs.log_file(step) if step and watch.logs else None
        what = f"step {step!r} failed" if step else f"the pipeline failed: {ANSI.sub('', str(err))}"
        raise PipelineRunFailed(
            what, step=step, log=log, tail=watch.tail(step) if step else [], run_dir=run_dir()
        ) from err
    folder = run_dir()
    if folder is None:
        raise RuntimeError(f"the local run left no folder {prefix}* in {pipeline_root}")
    if upload_uri:
        from teleguard.storage import put_dir

        put_dir(folder, f"{upload_uri.rstrip('/')}/{folder.name}")
    return folder
