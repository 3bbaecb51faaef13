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
