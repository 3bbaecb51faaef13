"""The SAFE-QAQ pipeline compiles with GPU placement on the GPU steps only (issue 5, in progress)."""

from __future__ import annotations

from pathlib import Path

import yaml
from kfp import compiler

from teleguard.pipelines.safe_qaq import safe_qaq

GPU_STEPS = {"warm-start-sft", "grpo-stage1", "rejection-sampling", "rsft", "lcrl", "realtime-grpo", "export-model",
             "evaluate"}  # fmt: skip


def test_gpu_steps_carry_the_gpu_settings_and_cpu_steps_none(tmp_path: Path) -> None:
    path = tmp_path / "safe_qaq.yaml"
    compiler.Compiler().compile(safe_qaq, str(path))
    spec, platform = list(yaml.safe_load_all(path.read_text("utf-8")))
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    seen = set()
    for name, executor in executors.items():
        step = name.removeprefix("exec-")
        resources = executor["container"].get("resources", {})
        if step in GPU_STEPS:
            seen.add(step)
            assert resources["accelerator"]["resourceCount"] and resources["accelerator"]["resourceType"]
            assert k8s[name]["nodeSelector"]["nodeSelectorJson"] == {
                "componentInputParameter": "gpu_node_selector"
            }
            assert k8s[name]["tolerations"][0]["tolerationJson"] == {
                "componentInputParameter": "gpu_tolerations"
            }
            assert k8s[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
            assert k8s[name]["emptyDirMounts"][0]["medium"] == "Memory"
        else:
            assert "accelerator" not in resources, step
            assert name not in k8s or not {"nodeSelector", "tolerations"} & set(k8s[name]), step
    assert seen == GPU_STEPS

    tasks = {**spec["root"]["dag"]["tasks"]}
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    for name, task in tasks.items():
        if name in GPU_STEPS:
            assert task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"]
            assert not task.get("cachingOptions", {}).get("enableCache")
    assert tasks["build-data"]["cachingOptions"]["enableCache"] is True

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all("defaultValue" in p or p.get("isOptional") for p in params.values())
    assert params["gpu_count"]["defaultValue"] == 4
