"""The SAFE-QAQ pipeline compiles with GPU placement on the GPU steps only (issue 5, in progress)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import compiler

from teleguard.pipeline.definitions.safe_qaq import safe_qaq
from tests.support.crds import crd_errors
from tests.support.paths import REPO

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
            assert not {"nodeSelector", "tolerations"} & set(k8s[name]), step
        # every step can reach S3/MinIO with the profile's Secret and the teleguard-storage ConfigMap
        secret = k8s[name]["secretAsEnv"][0]["secretNameParameter"]["componentInputParameter"]
        assert secret.endswith("storage_secret"), step  # inside the gate's sub-DAG it is a pipelinechannel
        assert k8s[name]["configMapAsEnv"][0]["keyToEnv"] == [
            {"configMapKey": "endpoint", "envVar": "S3_ENDPOINT"}
        ]
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


def test_compiled_files_are_in_sync(tmp_path: Path, monkeypatch) -> None:
    from teleguard.pipeline.cluster import compile_pipelines
    from teleguard.pipeline.registry import COMPILED_DIR, MANIFEST_FILE, PIPELINES, SPEC_FILE

    monkeypatch.delenv("TELEGUARD_TRAINER_IMAGE", raising=False)
    compile_pipelines(tmp_path)
    names = [SPEC_FILE, MANIFEST_FILE] + [
        f for i in PIPELINES.values() for f in (i.spec_file, i.manifest_file)
    ]
    for name in dict.fromkeys(names):
        # parsed, not as text: the compiler's header comment prints dict defaults in no fixed order
        fresh = list(yaml.safe_load_all((tmp_path / name).read_text("utf-8")))
        committed = list(yaml.safe_load_all((COMPILED_DIR / name).read_text("utf-8")))
        assert fresh == committed, f"pipelines/compiled/{name} is stale: run `teleguard pipeline compile`"


@pytest.mark.parametrize(
    "key", ["safe-qaq", "teacher-judge", "classifier-reward", "distill-cascade", "rm-dpo"]
)
def test_pipeline_manifests_validate_against_the_crds(key: str) -> None:
    from teleguard.pipeline.registry import COMPILED_DIR, pipeline_info

    info = pipeline_info(key)
    docs = list(yaml.safe_load_all((COMPILED_DIR / info.manifest_file).read_text("utf-8")))
    assert [d["kind"] for d in docs] == ["Pipeline", "PipelineVersion"]
    files = {
        "Pipeline": "pipelines.kubeflow.org_pipelines.yaml",
        "PipelineVersion": "pipelines.kubeflow.org_pipelineversions.yaml",
    }
    for doc in docs:
        assert not crd_errors(doc, files[doc["kind"]])
    version = docs[1]
    assert version["spec"]["pipelineName"] == docs[0]["metadata"]["name"]
    assert version["spec"]["pipelineSpec"]["pipelineInfo"]["name"] == info.name() == f"teleguard-{key}"


@pytest.mark.parametrize("key", ["teacher-judge", "classifier-reward", "distill-cascade", "rm-dpo"])
def test_seed_pipelines_put_training_on_the_gpu_pool_and_have_runnable_defaults(
    key: str, tmp_path: Path
) -> None:
    from teleguard.pipeline.registry import pipeline_info

    info = pipeline_info(key)
    path = tmp_path / info.spec_file
    compiler.Compiler().compile(info.function(), str(path))
    spec, platform = list(yaml.safe_load_all(path.read_text("utf-8")))
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = {n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert {"exec-evaluate-recipe", "exec-export-model"} <= gpu
    for name in gpu:
        assert k8s[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert k8s[name]["tolerations"] and k8s[name]["nodeSelector"]
    for name in set(executors) - gpu:
        assert not {"nodeSelector", "tolerations"} & set(k8s[name]), name
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all("defaultValue" in p or p.get("isOptional") for p in params.values())
    recipe = params["recipe"]["defaultValue"].removeprefix("/opt/teleguard/")
    assert (REPO / recipe).is_file()  # the trainer image ships it


def test_kfp_launcher_configmap_points_at_minio_with_secret_credentials() -> None:
    path = REPO / "manifests" / "kfp-launcher-minio.yaml"
    config = yaml.safe_load(path.read_text("utf-8"))
    assert (config["kind"], config["metadata"]["name"]) == ("ConfigMap", "kfp-launcher")
    assert config["data"]["defaultPipelineRoot"].startswith("s3://")  # served by the s3 provider below
    s3 = yaml.safe_load(config["data"]["providers"])["s3"]["default"]
    assert s3["forcePathStyle"] is True and s3["endpoint"]
    assert s3["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": "teleguard-minio",
            "accessKeyKey": "accesskey",
            "secretKeyKey": "secretkey",
        },
    }


def compiled_parameters() -> dict[str, dict[str, dict]]:
    """Every compiled file of pipelines/compiled/ (specs and manifests) with its pipeline's input parameters."""
    from teleguard.pipeline.registry import COMPILED_DIR

    found = {}
    for path in sorted(COMPILED_DIR.glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text("utf-8")))
        spec = docs[1]["spec"]["pipelineSpec"] if path.name.endswith(".k8s.yaml") else docs[0]
        found[path.name] = spec["root"]["inputDefinitions"]["parameters"]
    return found


def test_shared_parameters_agree_across_every_compiled_pipeline() -> None:
    """The parameters declared once (definitions.shared.Parameters) have one name, type and default in every
    compiled pipeline; every pipeline has all but the optional ones; `recipe` defaults to the pipeline's own."""
    from teleguard.pipeline.definitions.shared import OPTIONAL, shared_parameters
    from teleguard.pipeline.registry import PIPELINES

    compiled = compiled_parameters()
    assert len(compiled) == 2 * len(PIPELINES)
    recipes = {f"{i.module}{ext}": k for k, i in PIPELINES.items() for ext in (".yaml", ".k8s.yaml")}
    for param in shared_parameters("", OPTIONAL):
        having = {name: params[param.name] for name, params in compiled.items() if param.name in params}
        if param.name not in OPTIONAL:
            assert set(having) == set(compiled), (
                f"{param.name}: missing in {sorted(set(compiled) - set(having))}"
            )
        assert len({p["parameterType"] for p in having.values()}) == 1, (param.name, having)
        for name, p in having.items():
            expected = (
                f"/opt/teleguard/recipes/{recipes[name]}/qwen2-audio-7b.yaml"
                if param.name == "recipe"
                else param.default
            )
            assert p["defaultValue"] == expected, (name, param.name, p["defaultValue"])


def test_task_setters_still_name_themselves_while_a_graph_is_built() -> None:
    """`quick_caller_names` (a cheaper caller lookup for KFP's task setters) keeps KFP's error message."""
    from kfp import dsl
    from kfp.dsl import pipeline_task

    from teleguard.pipeline.definitions.shared import quick_caller_names

    # no annotations: this file's postponed ones are strings, which KFP cannot read
    @dsl.component
    def step():
        pass

    @dsl.pipeline
    def inner():
        step()

    saved = pipeline_task.inspect
    with (
        quick_caller_names(),
        pytest.raises(ValueError, match=r"^set_cpu_request can only be used on single"),
    ):

        @dsl.pipeline
        def outer():
            inner().set_cpu_request("1")  # a pipeline used as a task has no container to size

    assert pipeline_task.inspect is saved
