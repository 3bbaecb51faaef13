"""Compiling the pipelines for a cluster and submitting a run to one.

- `compile_pipelines(folder)`: each pipeline's spec to upload in the Kubeflow UI (`safe_qaq.yaml`, ...) and the
  same pipeline as Kubernetes Pipeline / PipelineVersion resources for GitOps (`safe_qaq.k8s.yaml`, ...).
- `submit(host, arguments)`: upload the compiled spec (or a new version of it) and start a run on a cluster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from teleguard.pipeline.registry import COMPILED_DIR, PIPELINES, pipeline_info, pipeline_version_name


def compile_pipelines(folder: Path, keys: list[str] | None = None) -> list[Path]:
    from kfp import compiler
    from kfp.compiler import KubernetesManifestOptions

    # The image is part of the compiled spec: the released name (components.images) unless
    # TELEGUARD_TRAINER_IMAGE names another.
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
