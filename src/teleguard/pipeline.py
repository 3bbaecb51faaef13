"""Compiling, running and submitting the SAFE-QAQ pipeline.

- `compile_pipelines(folder)`: the pipeline spec to upload in the Kubeflow UI (`safe_qaq.yaml`) and the same
  pipeline as Kubernetes Pipeline / PipelineVersion resources for GitOps (`safe_qaq.k8s.yaml`).
"""

from __future__ import annotations

import os
from pathlib import Path

from teleguard import __version__

COMPILED_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "compiled"
SPEC_FILE, MANIFEST_FILE = "safe_qaq.yaml", "safe_qaq.k8s.yaml"


def pipeline_version_name() -> str:
    return f"teleguard-safe-qaq-v{__version__.replace('.', '-')}"


def compile_pipelines(folder: Path) -> list[Path]:
    from kfp import compiler
    from kfp.compiler import KubernetesManifestOptions

    # The image is part of the compiled spec: compile with the released name unless one is asked for.
    os.environ.setdefault("TELEGUARD_TRAINER_IMAGE", f"ghcr.io/teleguard/teleguard-trainer:{__version__}")
    from teleguard.pipelines.safe_qaq import PIPELINE_NAME, safe_qaq

    folder.mkdir(parents=True, exist_ok=True)
    spec, manifest = folder / SPEC_FILE, folder / MANIFEST_FILE
    compiler.Compiler().compile(safe_qaq, str(spec))
    options = KubernetesManifestOptions(
        pipeline_name=PIPELINE_NAME,
        pipeline_display_name="teleguard SAFE-QAQ",
        pipeline_version_name=pipeline_version_name(),
        include_pipeline_manifest=True,
    )
    compiler.Compiler().compile(
        safe_qaq, str(manifest), kubernetes_manifest_format=True, kubernetes_manifest_options=options
    )
    return [spec, manifest]


def local_arguments(recipe: str, data_uri: str, registry_uri: str, **extra: object) -> dict[str, object]:
    """Pipeline arguments for KFP's local runner: text data, the recipe's own start model, no GPU settings used."""
    return {
        "data_uri": data_uri,
        "base_model_uri": "",
        "recipe": recipe,
        "use_audio": False,
        "registry_uri": registry_uri,
        **extra,
    }


def run_local(arguments: dict[str, object], pipeline_root: Path) -> object:
    """Run the whole pipeline with KFP's local runner in this Python environment (no Docker, no cluster).

    Kubernetes settings (GPU pool, shm, tolerations) are ignored locally; artifacts land under pipeline_root.
    """
    from kfp import local

    from teleguard.pipelines.safe_qaq import safe_qaq

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    return safe_qaq(**arguments)


def submit(
    host: str,
    arguments: dict[str, object],
    *,
    experiment: str = "teleguard",
    namespace: str | None = None,
    token: str | None = None,
    spec: Path | None = None,
) -> str:
    """Upload the compiled pipeline (a new version if it exists), then start a run in an experiment.

    The token comes from the caller or KF_PIPELINES_TOKEN; without one, the kfp client reads the kubeconfig.
    Returns the run id.
    """
    import kfp

    from teleguard.pipelines.safe_qaq import PIPELINE_NAME

    spec = spec or COMPILED_DIR / SPEC_FILE
    client = kfp.Client(
        host=host, existing_token=token or os.environ.get("KF_PIPELINES_TOKEN"), namespace=namespace
    )
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    version = f"{pipeline_version_name()}-{os.urandom(3).hex()}"
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(spec), pipeline_name=PIPELINE_NAME)
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
        version_id = versions[0].pipeline_version_id
    else:
        uploaded = client.upload_pipeline_version(
            str(spec), pipeline_version_name=version, pipeline_id=pipeline_id
        )
        version_id = uploaded.pipeline_version_id
    exp = client.create_experiment(experiment, namespace=namespace)
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=f"{PIPELINE_NAME}-{os.urandom(3).hex()}",
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    return run.run_id
