"""Compiling, running and submitting the SAFE-QAQ pipeline and the seed-recipe variants (`PIPELINES`).

- `compile_pipelines(folder)`: each pipeline's spec to upload in the Kubeflow UI (`safe_qaq.yaml`, ...) and the
  same pipeline as Kubernetes Pipeline / PipelineVersion resources for GitOps (`safe_qaq.k8s.yaml`, ...).
- `run_local(arguments, root)`: the whole pipeline with KFP's local runner (the main job on this machine).
- `submit(host, arguments)`: upload the compiled spec (or a new version of it) and start a run on a cluster.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from teleguard import __version__

COMPILED_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "compiled"
SPEC_FILE, MANIFEST_FILE = "safe_qaq.yaml", "safe_qaq.k8s.yaml"


@dataclass(frozen=True)
class PipelineInfo:
    """A pipeline of `PIPELINES`. Everything about it comes from its definition module (pipelines/<module>.py),
    which declares the same names in every pipeline: the pipeline function (named like the module),
    PIPELINE_NAME, TITLE and STEPS (its KFP task names in the order they run, with what each is for)."""

    module: str  # under teleguard.pipelines

    def definition(self) -> ModuleType:
        return importlib.import_module(f"teleguard.pipelines.{self.module}")

    def function(self) -> Any:
        return getattr(self.definition(), self.module)

    def name(self) -> str:
        return str(self.definition().PIPELINE_NAME)

    @property
    def title(self) -> str:
        return str(self.definition().TITLE)

    def steps(self) -> dict[str, str]:
        return dict(self.definition().STEPS)

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


def pipeline_info(key: str) -> PipelineInfo:
    if key not in PIPELINES:
        raise ValueError(f"unknown pipeline {key!r}; pipelines: {', '.join(PIPELINES)}")
    return PIPELINES[key]


def pipeline_version_name(key: str = "safe-qaq") -> str:
    return f"teleguard-{key}-v{__version__.replace('.', '-')}"


def compile_pipelines(folder: Path, keys: list[str] | None = None) -> list[Path]:
    from kfp import compiler
    from kfp.compiler import KubernetesManifestOptions

    # The image is part of the compiled spec: compile with the released name unless one is asked for.
    os.environ.setdefault("TELEGUARD_TRAINER_IMAGE", f"ghcr.io/teleguard/teleguard-trainer:{__version__}")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys or list(PIPELINES):
        info = pipeline_info(key)
        function = info.function()
        spec, manifest = folder / info.spec_file, folder / info.manifest_file
        compiler.Compiler().compile(function, str(spec))
        options = KubernetesManifestOptions(
            pipeline_name=info.name(),
            pipeline_display_name=info.title,
            pipeline_version_name=pipeline_version_name(key),
            include_pipeline_manifest=True,
        )
        compiler.Compiler().compile(
            function, str(manifest), kubernetes_manifest_format=True, kubernetes_manifest_options=options
        )
        written += [spec, manifest]
    return written


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

    from teleguard.pipeline_arguments import localize
    from teleguard.pipeline_progress import ANSI, RunWatch

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


def kubeconfig_token(environ: dict[str, str] | None = None) -> str | None:
    """The bearer token for the KFP API: KF_PIPELINES_TOKEN, else the current kubeconfig context's token."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("KF_PIPELINES_TOKEN"):
        return environ["KF_PIPELINES_TOKEN"]
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=environ.get("KUBECONFIG"), client_configuration=configuration)
    except (config.ConfigException, OSError):
        return None  # no kubeconfig: the API may not need a token (port-forward, in-cluster proxy)
    auth = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    return auth.removeprefix("Bearer ").strip() if auth else None


def submit(
    host: str,
    arguments: dict[str, object],
    *,
    experiment: str = "teleguard",
    namespace: str | None = None,
    token: str | None = None,
    spec: Path | None = None,
    pipeline: str = "safe-qaq",
) -> str:
    """Start a run of the compiled pipeline in an experiment; returns the run id.

    The pipeline is uploaded the first time (the server names that first version after the pipeline); after
    that a version named by the spec's sha256 is added only when no version has that name, so submitting the
    same spec again reuses it.
    """
    import hashlib

    import kfp

    info = pipeline_info(pipeline)
    PIPELINE_NAME = info.name()
    spec = spec or COMPILED_DIR / info.spec_file
    version_name = f"{pipeline_version_name(pipeline)}-{hashlib.sha256(spec.read_bytes()).hexdigest()[:10]}"
    client = kfp.Client(
        host=host, existing_token=token or kubeconfig_token(), namespace=namespace or "kubeflow"
    )
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    version_id = None
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            str(spec), pipeline_name=PIPELINE_NAME, description=info.title
        ).pipeline_id
        [version] = client.list_pipeline_versions(pipeline_id).pipeline_versions
        version_id = version.pipeline_version_id
    else:
        versions = client.list_pipeline_versions(pipeline_id, page_size=100).pipeline_versions or []
        version_id = next((v.pipeline_version_id for v in versions if v.display_name == version_name), None)
    if version_id is None:
        version_id = client.upload_pipeline_version(
            str(spec), pipeline_version_name=version_name, pipeline_id=pipeline_id
        ).pipeline_version_id
    exp = client.create_experiment(experiment, namespace=namespace)
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    return run.run_id
