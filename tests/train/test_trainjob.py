"""GRPO on several GPU nodes: the TrainJob a pipeline step launches, followed through the Kubernetes API.

The cluster is the one boundary that cannot run here: a stand-in API server (tests/support/fake_kubernetes.py) runs
node 0's trainer command as a local process. Everything on teleguard's side is real: the TrainJob resource
(validated against the Trainer CRD), the kubernetes client, `teleguard train` on S3 URIs (moto), ms-swift.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teleguard.pipeline.steps.training import trainjob_stage_step
from teleguard.storage import put_dir
from teleguard.train.distributed import node_rank
from teleguard.train.trainjob import (
    TrainJobError,
    TrainJobRunner,
    TrainJobSettings,
    stage_command,
    trainjob_manifest,
)
from tests.support.crds import crd_errors
from tests.support.fake_kubernetes import FakeKubernetes
from tests.support.recipes import QUICK_GRPO, write_recipe

TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"
# GRPO alone; the other stages' CPU settings only so the recipe validates
STAGES = {"grpo": QUICK_GRPO, "sample": {"engine": "transformers"}, "lcrl": {**QUICK_GRPO, "enabled": False},
          "realtime": {**QUICK_GRPO, "enabled": False}}  # fmt: skip
SECRETS = {"teleguard-minio": {"accesskey": "tg-access", "secretkey": "tg-secret-9c1e"}}


def settings(**extra: object) -> TrainJobSettings:
    return TrainJobSettings(
        namespace="kubeflow-user", image="ghcr.io/teleguard/teleguard-trainer:0.1.0", num_nodes=2, gpus_per_node=8,
        node_selector={"teleguard.io/node-pool": "gpu"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        poll_seconds=0.2, **extra,
    )  # fmt: skip


def test_trainjob_resource_validates_and_carries_placement_without_secrets() -> None:
    command = stage_command("grpo", "/opt/teleguard/recipes/safe-qaq/qwen2-audio-7b.yaml", {"stages.grpo.max_steps": 5},
                            datasets="s3://p/datasets", start_model="s3://p/sft/model", output_dir="s3://p/out")  # fmt: skip
    manifest = trainjob_manifest("teleguard-grpo-0123456789", command, settings())
    assert not crd_errors(manifest, TRAINJOB_CRD)
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert trainer["command"][:5] == ["teleguard", "train", "grpo", "--config", command[4]]
    assert "stages.grpo.max_steps=5" in trainer["command"] and "--start-model" in trainer["command"]
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][
        0
    ]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert (
        pod["nodeSelector"] == {"teleguard.io/node-pool": "gpu"}
        and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/dev/shm"
    # credentials are references to the Secret, never values
    assert "tg-secret" not in json.dumps(manifest)
    refs = {e["name"]: e["valueFrom"] for e in trainer["env"] if "valueFrom" in e}
    assert refs["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"] == {"name": "teleguard-minio", "key": "secretkey"}
    # a misspelt field is caught offline, before a cluster would prune it
    manifest["spec"]["trainer"]["numNode"] = 2
    assert any("numNode" in e for e in crd_errors(manifest, TRAINJOB_CRD))


def test_node_rank_comes_from_either_launcher() -> None:
    assert node_rank({}) == 0
    assert node_rank({"PET_NODE_RANK": "1", "RANK": "0"}) == 1
    assert node_rank({"RANK": "3"}) == 3


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRETS["teleguard-minio"]["accesskey"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["teleguard-minio"]["secretkey"])
    monkeypatch.setenv("TELEGUARD_STORAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TELEGUARD_WORK_DIR", str(tmp_path / "work"))
    return s3_endpoint


@pytest.mark.slow
def test_grpo_stage_runs_as_a_trainjob(tiny_text_model, text_datasets: Path, tmp_path: Path, s3: str) -> None:
    root = "s3://tg-pipeline-root/run-1"
    put_dir(text_datasets, f"{root}/synthesize-audio/datasets")
    put_dir(tiny_text_model.path, f"{root}/warm-start-sft/model")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_text_model, text_datasets, tmp_path / "unused", STAGES)
    lines: list[str] = []
    with FakeKubernetes(SECRETS, {"teleguard-storage": {"endpoint": s3}}) as k8s:
        metrics = trainjob_stage_step(
            "grpo", str(recipe), {"stages.grpo.max_steps": 1}, datasets_uri=f"{root}/synthesize-audio/datasets",
            start_model_uri=f"{root}/warm-start-sft/model", output_uri=f"{root}/grpo-stage1/model",
            out_model=tmp_path / "model", settings=settings(), runner=TrainJobRunner(k8s.api_client(), log=lines.append),
        )  # fmt: skip
        [job] = k8s.trainjobs.values()
    assert metrics["nodes"] == 2 and metrics["trainjob"] == job["metadata"]["name"]
    assert metrics["global_step/max_steps"] == "1/1"  # ms-swift's own log, from node 0's manifest
    assert (tmp_path / "model" / "config.json").is_file()
    manifest = json.loads((tmp_path / "model" / "stage-manifest.json").read_text("utf-8"))
    assert manifest["stage"] == "grpo" and manifest["config"]["max_steps"] == 1
    assert any(
        line.startswith(f"[{job['metadata']['name']}-node-0") for line in lines
    )  # node 0's log followed
    assert lines[-1].endswith("complete")


@pytest.mark.slow
def test_a_failed_trainjob_fails_the_step_with_its_error(
    tiny_text_model, text_datasets: Path, tmp_path: Path, s3: str
) -> None:
    root = "s3://tg-pipeline-root/run-2"
    put_dir(text_datasets, f"{root}/datasets")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_text_model, text_datasets, tmp_path / "unused", STAGES)
    with (
        FakeKubernetes(SECRETS, {"teleguard-storage": {"endpoint": s3}}) as k8s,
        pytest.raises(TrainJobError) as info,
    ):
        trainjob_stage_step(
            "grpo", str(recipe), {}, datasets_uri=f"{root}/datasets", start_model_uri=f"{root}/no-such-model",
            output_uri=f"{root}/grpo-stage1/model", out_model=tmp_path / "model", settings=settings(),
            runner=TrainJobRunner(k8s.api_client(), log=lambda line: None),
        )  # fmt: skip
    assert "failed" in str(info.value) and "no-such-model" in str(info.value)
    assert not (tmp_path / "model").exists()


def test_multi_node_needs_artifacts_in_s3(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pipeline root to an s3:// or minio:// URI"):
        trainjob_stage_step("grpo", "r.yaml", {}, datasets_uri=str(tmp_path), start_model_uri="s3://b/m",
                            output_uri="s3://b/o", out_model=tmp_path / "m", settings=settings())  # fmt: skip
