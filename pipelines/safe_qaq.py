"""The SAFE-QAQ pipeline: data -> warm-start SFT -> GRPO -> rejection sampling -> RSFT -> LCRL -> real-time GRPO
-> export -> evaluation -> (quality gate) -> registration.

GPU steps go to the GPU node pool (node selector, toleration, accelerator type and count, a memory-backed
/dev/shm, CPU/memory requests, retries with backoff) and are never cached; CPU steps stay on the default pool,
and the data steps are cached. Checkpoints move between steps as artifacts (MinIO on a cluster: see
manifests/kfp-launcher-minio.yaml). Compile with `teleguard pipeline compile`.
"""

from kfp import dsl, kubernetes

from teleguard.components.data import build_data, synthesize_audio
from teleguard.components.evaluation import evaluate, quality_gate, register_model
from teleguard.components.images import TRAINER_IMAGE
from teleguard.components.training import (
    export_model,
    grpo_stage1,
    lcrl,
    realtime_grpo,
    rejection_sampling,
    rsft,
    select_shortest_correct,
    start_model,
    warm_start_sft,
)

PIPELINE_NAME = "teleguard-safe-qaq"
# Each pipeline module declares its PIPELINE_NAME, TITLE (the display name in Kubeflow and the run summary) and
# STEPS: its KFP task names (a local run leaves one folder each) in the order they run, with what each is for.
TITLE = "teleguard SAFE-QAQ"
STEPS = {
    "build-data": "ingest, split, build datasets",
    "synthesize-audio": "call audio (or text passed through)",
    "start-model": "base model",
    "warm-start-sft": "warm-start SFT",
    "grpo-stage1": "stage 1: GRPO",
    "rejection-sampling": "stage 2a: sampling",
    "select-shortest-correct": "stage 2a: selection",
    "rsft": "stage 2b: RSFT",
    "lcrl": "stage 2c: LCRL",
    "realtime-grpo": "stage 3: real-time GRPO",
    "export-model": "serving model",
    "evaluate": "evaluation",
    "quality-gate": "quality gate",
    "register-model": "registration",
}
SHM_SIZE = "16Gi"  # NCCL and the data loaders need more than the container default of 64 MiB
GPU_CPU_REQUEST, GPU_MEMORY_REQUEST = "8", "64Gi"
CPU_CPU_REQUEST, CPU_MEMORY_REQUEST = "2", "8Gi"
STORAGE_CONFIG_MAP = "teleguard-storage"  # data: endpoint (e.g. http://minio.teleguard.svc:9000)


def on_gpu_pool(
    task: dsl.PipelineTask, gpu_type: str, gpu_count: int, node_selector: dict, tolerations: list
) -> dsl.PipelineTask:
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    task.set_cpu_request(GPU_CPU_REQUEST).set_memory_request(GPU_MEMORY_REQUEST)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    # a preempted GPU node: retry; the stage resumes from its last checkpoint (a local run drops the retries:
    # see teleguard.pipeline.without_retries)
    task.set_retry(num_retries=2, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="1800s")
    return task.set_caching_options(False)


def on_cpu_pool(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
    task.set_cpu_request(CPU_CPU_REQUEST).set_memory_request(CPU_MEMORY_REQUEST)
    return task.set_caching_options(cache)


def with_storage(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """S3/MinIO settings for teleguard's own reads and writes (s3:// data, registry, multi-node stages):
    keys from the Secret the KFP launcher uses too, the endpoint from the teleguard-storage ConfigMap.
    Both optional, so a pipeline on local or public data runs without them."""
    keys = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=STORAGE_CONFIG_MAP,
        config_map_key_to_env={"endpoint": "S3_ENDPOINT"},
        optional=True,
    )
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="SAFE-QAQ: slow-thinking call-fraud detector trained with RL")
def safe_qaq(
    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues",
    source_format: str = "dialogues",
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct",
    recipe: str = "/opt/teleguard/recipes/safe-qaq/qwen2-audio-7b.yaml",
    recipe_overrides: dict = {},  # noqa: B006 (KFP pipeline parameters take literal defaults)
    prompts: str = "",
    max_transcript_chars: int = 0,
    evidence_chars: int = 0,
    split_seed: int = 0,
    use_audio: bool = True,
    audio_calls_limit: int = 0,
    gpu_type: str = "nvidia.com/gpu",
    gpu_count: int = 4,
    gpu_node_selector: dict = {"teleguard.io/node-pool": "gpu"},  # noqa: B006
    gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],  # noqa: B006
    grpo_num_nodes: int = 1,
    storage_secret: str = "teleguard-minio",
    trainer_image: str = TRAINER_IMAGE,
    run_warm_start_sft: bool = False,
    run_stage1_grpo: bool = True,
    run_rsft: bool = True,
    run_lcrl: bool = True,
    run_realtime: bool = True,
    compare_stages: bool = True,
    min_live_accuracy: float = 0.9,
    max_false_alarm_rate: float = 0.05,
    min_live_fraud_type_accuracy: float = 0.6,
    min_flagged_within_half: float = 0.5,
    min_well_formed: float = 0.9,
    registry_uri: str = "s3://teleguard/registry",
    model_name: str = "teleguard-detector",
):
    def gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
        return with_storage(
            on_gpu_pool(task, gpu_type, gpu_count, gpu_node_selector, gpu_tolerations), storage_secret
        )

    def cpu(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
        return with_storage(on_cpu_pool(task, cache), storage_secret)

    recipe_args = {"recipe": recipe, "recipe_overrides": recipe_overrides}
    # GRPO stages may span several GPU nodes (a TrainJob); the step pod itself still lands on the GPU pool
    nodes_args = {
        "num_nodes": grpo_num_nodes, "trainer_image": trainer_image, "gpu_type": gpu_type, "gpu_count": gpu_count,
        "gpu_node_selector": gpu_node_selector, "gpu_tolerations": gpu_tolerations,
    }  # fmt: skip
    data = cpu(
        build_data(
            data_uri=data_uri, source_format=source_format, prompts=prompts, max_transcript_chars=max_transcript_chars,
            evidence_chars=evidence_chars, split_seed=split_seed,
        ),
        cache=True,
    ).set_display_name("build data")  # fmt: skip
    audio = cpu(
        synthesize_audio(
            enabled=use_audio, calls=data.outputs["calls"], text_datasets=data.outputs["datasets"],
            limit=audio_calls_limit, prompts=prompts,
        ),
        cache=True,
    ).set_display_name("synthesize audio")  # fmt: skip
    # one component for both modalities: KFP's local runner cannot resolve a dsl.OneOf of two branches
    datasets = audio.outputs["datasets"]

    base = cpu(start_model(base_model_uri=base_model_uri, datasets=datasets, **recipe_args), cache=True)
    base.set_display_name("start model")
    sft = gpu(
        warm_start_sft(
            enabled=run_warm_start_sft, datasets=datasets, start=base.outputs["model"], **recipe_args
        )
    )
    stage1 = gpu(
        grpo_stage1(
            enabled=run_stage1_grpo,
            datasets=datasets,
            start=sft.outputs["model"],
            **nodes_args,
            **recipe_args,
        )
    )
    samples = gpu(rejection_sampling(datasets=datasets, policy=stage1.outputs["model"], **recipe_args))
    selection = cpu(select_shortest_correct(samples=samples.outputs["samples"]), cache=False)
    stage2b = gpu(
        rsft(enabled=run_rsft, datasets=datasets, selection=selection.outputs["selection"],
             start=stage1.outputs["model"], **recipe_args)
    )  # fmt: skip
    stage2c = gpu(
        lcrl(enabled=run_lcrl, datasets=datasets, start=stage2b.outputs["model"], **nodes_args, **recipe_args)
    )
    stage3 = gpu(
        realtime_grpo(
            enabled=run_realtime,
            datasets=datasets,
            start=stage2c.outputs["model"],
            **nodes_args,
            **recipe_args,
        )
    )
    exported = gpu(export_model(datasets=datasets, start=stage3.outputs["model"], **recipe_args))
    evaluation = gpu(
        evaluate(
            datasets=datasets, calls=data.outputs["calls"], audio_calls=audio.outputs["audio_calls"],
            final_model=exported.outputs["model"], stage1_model=stage1.outputs["model"],
            rsft_model=stage2b.outputs["model"], lcrl_model=stage2c.outputs["model"], compare_stages=compare_stages,
            **recipe_args,
        )
    )  # fmt: skip
    gate = cpu(
        quality_gate(
            summary=evaluation.outputs["Output"], min_live_accuracy=min_live_accuracy,
            max_false_alarm_rate=max_false_alarm_rate, min_live_fraud_type_accuracy=min_live_fraud_type_accuracy,
            min_flagged_within_half=min_flagged_within_half, min_well_formed=min_well_formed,
        ),
        cache=False,
    ).set_display_name("quality gate")  # fmt: skip
    # the gate's single `Output`: KFP's local runner resolves only that form of a task output in a condition
    with dsl.If(gate.output == True, name="passed"):  # noqa: E712
        cpu(
            register_model(
                model=exported.outputs["model"], registry_uri=registry_uri, model_name=model_name,
                summary=evaluation.outputs["Output"],
            ),
            cache=False,
        ).set_display_name("register model")  # fmt: skip
