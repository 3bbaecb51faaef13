"""Rendering the Helm chart offline and checking what it renders (schemas, checkov)."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.crds import crd_validator
from tests.support.paths import REPO as ROOT

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is a dev dependency: make setup installs it"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a dev dependency"
)


CHART = ROOT / "helm" / "teleguard"
RULES = ROOT / "monitoring" / "prometheus" / "rules.yaml"
KUBE_VERSION = "1.33.0"  # a current Kubernetes release for kubernetes-validate's schemas
RELEASE, NAMESPACE = "teleguard", "teleguard"
VALUE_SETS = {
    "default": None,
    "gpu": CHART / "ci" / "gpu-values.yaml",
    "minimal": CHART / "ci" / "minimal-values.yaml",
}
# Custom resources and the CRD files (../shared/schemas/crds) they are validated against.
CRD_FILES = {
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "Pipeline": "pipelines.kubeflow.org_pipelines.yaml",
    "PipelineVersion": "pipelines.kubeflow.org_pipelineversions.yaml",
}
# Copies inside the chart (Helm reads only files under the chart) and their sources.
CHART_COPIES = {
    CHART / "files" / "rules.yaml": RULES,
    CHART / "files" / "pipeline" / "safe_qaq.yaml": ROOT / "pipelines" / "compiled" / "safe_qaq.yaml",
    CHART / "files" / "pipeline" / "safe_qaq.k8s.yaml": ROOT / "pipelines" / "compiled" / "safe_qaq.k8s.yaml",
}
CHECKOV = next(
    (str(p) for p in (ROOT / ".venv-checkov" / "bin" / "checkov",) if p.exists()), shutil.which("checkov")
)


_crd_validator = functools.cache(crd_validator)  # the CRD files are large: build each validator once


def values_of(name: str) -> dict[str, Any] | None:
    path = VALUE_SETS[name]
    return yaml.safe_load(path.read_text("utf-8")) if path else None


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them (no cluster contacted)."""
    return copy.deepcopy(_render(json.dumps(values, sort_keys=True)))


@functools.cache
def _render(values_json: str) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    out = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def validation_errors(docs: list[dict[str, Any]]) -> list[str]:
    """Every problem of every object: strict core-kind schemas, or the CRD schema with unknown fields refused."""
    errors = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc["kind"] in CRD_FILES:
            validator = _crd_validator(CRD_FILES[doc["kind"]], doc["apiVersion"].split("/")[1])
            errors += [
                f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)
            ]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{where}: {err.message} at {'.'.join(map(str, err.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{where}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {KUBE_VERSION}"
            )
    return errors


def checkov_failures(manifests: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """checkov's failed checks on a folder of manifests (offline), and the checks skipped by annotations."""
    if CHECKOV is None:
        pytest.skip(
            "checkov is not installed: `make setup` creates .venv-checkov (its pins clash with .venv's)"
        )
    proc = subprocess.run(
        [
            CHECKOV,
            "-d",
            str(manifests),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(manifests),
            "BC_SKIP_MAPPING": "TRUE",
            "LOG_LEVEL": "ERROR",
        },
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    reports = report if isinstance(report, list) else [report]
    failed, skipped = [], []
    for rep in reports:
        results = rep.get("results", {})
        failed += [
            f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results.get("failed_checks", [])
        ]
        skipped += results.get("skipped_checks", [])
    return failed, skipped


def write_manifests(docs: list[dict[str, Any]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# --- rendering, lint, validation -------------------------------------------------------------------------
