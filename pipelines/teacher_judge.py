"""Seed 001 as a teleguard recipe: GRPO whose reward mixes the rule rewards (0.6) with an LLM teacher judge (0.4).

data -> warm-start SFT -> GRPO (rule + teacher judge) -> export -> evaluation (held-out split, gold and red-team
sets). The judge is an OpenAI-compatible endpoint named in the recipe (an external API such as DeepSeek, or an
in-cluster vLLM); its key comes from the Secret `judge_secret` (key `api-key`). The CPU recipe serves a tiny
judge on loopback with `swift deploy` instead. Judgements are cached by content hash.
"""

from kfp import dsl

from teleguard.components.recipes import evaluate_recipe
from teleguard.components.training import export_model, grpo_stage1
from teleguard.pipelines.seed_common import (
    DEFAULT_NODE_SELECTOR,
    DEFAULT_TOLERATIONS,
    SEED_STEPS,
    Pools,
    warm_started,
    with_judge_key,
)

PIPELINE_NAME = "teleguard-teacher-judge"
# Each pipeline module declares its PIPELINE_NAME, TITLE (the display name in Kubeflow and the run summary) and
# STEPS: its KFP task names (a local run leaves one folder each) in the order they run, with what each is for.
TITLE = "teleguard seed 001: rule + teacher-judge rewards"
STEPS = {
    **SEED_STEPS,
    "grpo-stage1": "GRPO: 0.6 rule + 0.4 teacher judge",
    "export-model": "serving model",
    "evaluate-recipe": "evaluation (held-out, gold, red-team)",
}


@dsl.pipeline(
    name=PIPELINE_NAME, description="Seed 001: GRPO with rule rewards and a cached LLM teacher judge"
)
def teacher_judge(
    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues",
    source_format: str = "dialogues",
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct",
    recipe: str = "/opt/teleguard/recipes/teacher-judge/qwen2-audio-7b.yaml",
    recipe_overrides: dict = {},  # noqa: B006 (KFP pipeline parameters take literal defaults)
    prompts: str = "",
    max_transcript_chars: int = 0,
    evidence_chars: int = 0,
    use_audio: bool = True,
    gpu_type: str = "nvidia.com/gpu",
    gpu_count: int = 4,
    gpu_node_selector: dict = DEFAULT_NODE_SELECTOR,
    gpu_tolerations: list = DEFAULT_TOLERATIONS,
    storage_secret: str = "teleguard-minio",
    judge_secret: str = "teleguard-judge",
    run_warm_start_sft: bool = False,
):
    pools = Pools(gpu_type, gpu_count, gpu_node_selector, gpu_tolerations, storage_secret)
    recipe_args = {"recipe": recipe, "recipe_overrides": recipe_overrides}
    audio, _, sft = warm_started(
        pools, data_uri=data_uri, source_format=source_format, base_model_uri=base_model_uri, recipe_args=recipe_args,
        prompts=prompts, max_transcript_chars=max_transcript_chars, evidence_chars=evidence_chars,
        use_audio=use_audio, run_warm_start_sft=run_warm_start_sft,
    )  # fmt: skip
    datasets = audio.outputs["datasets"]
    grpo = pools.gpu(
        grpo_stage1(
            enabled=True, datasets=datasets, start=sft.outputs["model"], num_nodes=1, trainer_image="",
            gpu_type=gpu_type, gpu_count=gpu_count, gpu_node_selector=gpu_node_selector,
            gpu_tolerations=gpu_tolerations, **recipe_args,
        )
    )  # fmt: skip
    with_judge_key(grpo, judge_secret)
    exported = pools.gpu(export_model(datasets=datasets, start=grpo.outputs["model"], **recipe_args))
    sft_model = sft.outputs["model"]
    pools.gpu(
        evaluate_recipe(
            datasets=datasets, final_model=exported.outputs["model"], model_a=sft_model, model_b=sft_model,
            model_c=sft_model, model_d=sft_model, names=["sft"], aux_model=sft_model, aux="", cascade_threshold=0.0,
            **recipe_args,
        )
    )  # fmt: skip
