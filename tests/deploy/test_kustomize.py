"""manifests/: the kustomize base and the cpu-dev and gpu-prod overlays, for users without Helm.

manifests/base is the chart rendered with its default values (tests/deploy/test_helm_chart.py renders the same), Helm's
own labels dropped; `TELEGUARD_UPDATE_MANIFESTS=1 pytest tests/deploy/test_kustomize.py` rewrites it after a chart
change, and a test fails while it is stale. The overlays are built with the real kustomize (`kustomize build`,
or `kubectl kustomize`, which embeds kustomize v5) and pass the same checks as the chart: strict validation of
core kinds, CRD schemas with unknown fields refused, checkov.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm import (
    by_kind,
    checkov_failures,
    render,
    validation_errors,
    write_manifests,
)
from tests.support.paths import REPO as ROOT

MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
OVERLAYS = {"cpu-dev": "teleguard-dev", "gpu-prod": "teleguard"}
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def base_objects() -> list[dict[str, Any]]:
    """The chart's default rendering without Helm's bookkeeping labels."""
    docs = render()
    for doc in docs:
        for key in HELM_ONLY_LABELS:
            doc["metadata"].get("labels", {}).pop(key, None)
    return docs


def base_file(doc: dict[str, Any]) -> str:
    return f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"


HEADER = "# Generated from helm/teleguard (default values) by tests/deploy/test_kustomize.py: do not edit by hand.\n"


def write_base() -> None:
    docs = base_objects()
    for old in BASE.glob("*.yaml"):
        old.unlink()
    for doc in docs:
        (BASE / base_file(doc)).write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, width=110))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(base_file(d) for d in docs),
    }
    (BASE / "kustomization.yaml").write_text(HEADER + yaml.safe_dump(kustomization, sort_keys=False))


def kustomize(path: Path) -> list[dict[str, Any]]:
    if binary := shutil.which("kustomize"):
        command = [binary, "build", str(path)]
    elif binary := shutil.which("kubectl"):
        command = [binary, "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl (which embeds kustomize) is installed")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_base_is_the_charts_rendering() -> None:
    if os.environ.get("TELEGUARD_UPDATE_MANIFESTS"):
        write_base()
    expected = {base_file(d): d for d in base_objects()}
    found = {
        p.name: yaml.safe_load(p.read_text("utf-8"))
        for p in BASE.glob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    assert found == expected, (
        "manifests/base is stale: TELEGUARD_UPDATE_MANIFESTS=1 pytest tests/deploy/test_kustomize.py"
    )
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text("utf-8"))
    assert sorted(kustomization["resources"]) == sorted(expected)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_kustomization_builds_and_validates(overlay: str) -> None:
    path = BASE if overlay == "base" else MANIFESTS / "overlays" / overlay
    docs = kustomize(path)
    assert not validation_errors(docs)
    if overlay in OVERLAYS:
        assert {d["metadata"]["namespace"] for d in docs} == {OVERLAYS[overlay]}


def test_overlays_configure_the_detector() -> None:
    dev = kustomize(MANIFESTS / "overlays" / "cpu-dev")
    [isvc] = by_kind(dev, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert (
        "nodeSelector" not in predictor and "tolerations" not in predictor and "autoScaling" not in predictor
    )
    assert "nvidia.com/gpu" not in predictor["model"]["resources"]["limits"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "none"
    [serve] = [d for d in dev if d["kind"] == "ConfigMap" and "serve.yaml" in d.get("data", {})]
    dev_config = yaml.safe_load(serve["data"]["serve.yaml"])
    assert dev_config["engine"]["kind"] == "transformers"
    # one replica: calls in its memory, no Redis, no way out to one
    assert dev_config["detector"]["session_store"] == "memory" and predictor["maxReplicas"] == 1
    assert not by_kind(dev, "StatefulSet") and not by_kind(dev, "Service")
    [runtime] = by_kind(dev, "ServingRuntime")
    assert "TELEGUARD_SESSION_STORE" not in {e["name"] for e in runtime["spec"]["containers"][0]["env"]}
    [policy] = by_kind(dev, "NetworkPolicy")
    assert all(p["port"] != 6379 for rule in policy["spec"]["egress"] for p in rule["ports"])

    prod = kustomize(MANIFESTS / "overlays" / "gpu-prod")
    [isvc] = by_kind(prod, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    assert predictor["autoScaling"]["metrics"][0]["external"]["metric"]["backend"] == "prometheus"
    assert (
        predictor["minReplicas"] >= 2 and predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )
    [runtime] = by_kind(prod, "ServingRuntime")
    assert runtime["spec"]["containers"][0]["image"].startswith("ghcr.io/teleguard/teleguard-server")
    # the replicas share the base's Redis, kept on a claim with an append-only file
    [redis] = by_kind(prod, "StatefulSet")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and redis["spec"]["volumeClaimTemplates"]
    env = {e["name"]: e for e in runtime["spec"]["containers"][0]["env"]}
    assert env["TELEGUARD_SESSION_STORE"]["value"] == "redis://teleguard-redis:6379/0"
    # the RoleBinding follows its ServiceAccount into the overlay's namespace
    [binding] = by_kind(prod, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == "teleguard"


def test_checkov_passes_on_the_overlays(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        write_manifests(kustomize(MANIFESTS / "overlays" / overlay), tmp_path / overlay)
    failed, _ = checkov_failures(tmp_path)
    assert not failed
