"""What the seed-recipe pipelines share with SAFE-QAQ's: the pool settings and the steps up to the warm start."""

from kfp import dsl, kubernetes

from teleguard.components.data import build_data, synthesize_audio
from teleguard.components.training import start_model, warm_start_sft
from teleguard.pipelines.safe_qaq import on_cpu_pool, on_gpu_pool, with_storage

# The parameters every seed pipeline has, with SAFE-QAQ's defaults; each pipeline lists them in its signature
# (KFP reads parameters from the signature) and hands them to `Pools` and `warm_started`.
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_NODE_SELECTOR = {"teleguard.io/node-pool": "gpu"}
SEED_STEPS = {
    "build-data": "ingest, split, build datasets (with the gold and red-team sets)",
    "synthesize-audio": "call audio (or text passed through)",
    "start-model": "base model",
    "warm-start-sft": "warm-start SFT",
}


class Pools:
    """Puts a task on the GPU pool or the default pool, with the storage settings, as SAFE-QAQ does."""

    def __init__(self, gpu_type: str, gpu_count: int, node_selector: dict, tolerations: list, secret: str):
        self.gpu_type, self.gpu_count, self.secret = gpu_type, gpu_count, secret
        self.node_selector, self.tolerations = node_selector, tolerations

    def gpu(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        task = on_gpu_pool(task, self.gpu_type, self.gpu_count, self.node_selector, self.tolerations)
        return with_storage(task, self.secret)

    def cpu(self, task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
        return with_storage(on_cpu_pool(task, cache), self.secret)


def with_judge_key(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """The judge's API key from a Secret (key `api-key`), as the variable the judge reads; optional, so an
    in-cluster judge without a key needs no Secret."""
    kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env={"api-key": "TELEGUARD_JUDGE_API_KEY"}, optional=True
    )
    return task


def warm_started(
    pools: Pools,
    *,
    data_uri: str,
    source_format: str,
    base_model_uri: str,
    recipe_args: dict,
    prompts: str,
    max_transcript_chars: int,
    evidence_chars: int,
    use_audio: bool,
    run_warm_start_sft: bool,
) -> tuple[dsl.PipelineTask, dsl.PipelineTask, dsl.PipelineTask]:
    """Data, audio, start model and warm start: (the datasets task, the start-model task, the SFT task)."""
    data = pools.cpu(
        build_data(
            data_uri=data_uri, source_format=source_format, prompts=prompts, max_transcript_chars=max_transcript_chars,
            evidence_chars=evidence_chars, split_seed=0,
        ),
        cache=True,
    ).set_display_name("build data")  # fmt: skip
    audio = pools.cpu(
        synthesize_audio(
            enabled=use_audio, calls=data.outputs["calls"], text_datasets=data.outputs["datasets"], limit=0,
            prompts=prompts,
        ),
        cache=True,
    ).set_display_name("synthesize audio")  # fmt: skip
    datasets = audio.outputs["datasets"]
    base = pools.cpu(start_model(base_model_uri=base_model_uri, datasets=datasets, **recipe_args), cache=True)
    base.set_display_name("start model")
    sft = pools.gpu(
        warm_start_sft(
            enabled=run_warm_start_sft, datasets=datasets, start=base.outputs["model"], **recipe_args
        )
    )
    return audio, base, sft
