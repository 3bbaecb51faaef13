"""Seed 002 as a teleguard recipe: a fraud classifier (sequence classification) as a GRPO reward.

data -> warm-start SFT -> fraud classifier (`swift sft --task_type seq_cls`) -> GRPO (format + the classifier's
probability of the gold verdict) -> export -> evaluation, whose report shows the classifier reward's mean and
spread before (the warm-started model) and after RL.
"""

from kfp import dsl

from teleguard.components.recipes import classifier_grpo, evaluate_recipe, fraud_classifier
from teleguard.components.training import export_model
from teleguard.pipelines.seed_common import (
    DEFAULT_NODE_SELECTOR,
    DEFAULT_TOLERATIONS,
    SEED_STEPS,
    Pools,
    warm_started,
)

PIPELINE_NAME = "teleguard-classifier-reward"
# Each pipeline module declares its PIPELINE_NAME, TITLE (the display name in Kubeflow and the run summary) and
# STEPS: its KFP task names (a local run leaves one folder each) in the order they run, with what each is for.
TITLE = "teleguard seed 002: fraud-classifier reward"
STEPS = {
    **SEED_STEPS,
    "fraud-classifier": "fraud classifier (seq_cls)",
    "classifier-grpo": "GRPO: format + classifier reward",
    "export-model": "serving model",
    "evaluate-recipe": "evaluation + classifier reward before/after",
}


@dsl.pipeline(name=PIPELINE_NAME, description="Seed 002: GRPO with a fraud-classifier reward")
def classifier_reward(
    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues",
    source_format: str = "dialogues",
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct",
    recipe: str = "/opt/teleguard/recipes/classifier-reward/qwen2-audio-7b.yaml",
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
    sft_model = sft.outputs["model"]
    classifier = pools.gpu(fraud_classifier(datasets=datasets, start=sft_model, **recipe_args))
    grpo = pools.gpu(
        classifier_grpo(
            enabled=True,
            datasets=datasets,
            start=sft_model,
            classifier=classifier.outputs["model"],
            **recipe_args,
        )
    )
    exported = pools.gpu(export_model(datasets=datasets, start=grpo.outputs["model"], **recipe_args))
    pools.gpu(
        evaluate_recipe(
            datasets=datasets, final_model=exported.outputs["model"], model_a=sft_model, model_b=sft_model,
            model_c=sft_model, model_d=sft_model, names=["sft"], aux_model=classifier.outputs["model"],
            aux="classifier", cascade_threshold=0.0, **recipe_args,
        )
    )  # fmt: skip
