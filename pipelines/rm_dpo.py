"""Seed 004 as a teleguard recipe: a reward model, DPO, RM-ranked rejection sampling and PPO, next to GRPO.

data -> warm-start SFT -> N samples per prompt -> preference pairs (correct and short over wrong or long) ->
reward model (`swift rlhf --rlhf_type rm`) -> from the warm start, side by side: DPO on the pairs, SFT on the
samples the reward model ranks first, PPO against the reward model (KL coefficient, KL target checked), and the
GRPO path -> export (DPO) -> one report comparing them all.
"""

from kfp import dsl

from teleguard.components.recipes import dpo, evaluate_recipe, ppo, reward_model, rm_ranked_rsft
from teleguard.components.training import export_model, grpo_stage1, rejection_sampling
from teleguard.pipelines.seed_common import (
    DEFAULT_NODE_SELECTOR,
    DEFAULT_TOLERATIONS,
    SEED_STEPS,
    Pools,
    warm_started,
)

PIPELINE_NAME = "teleguard-rm-dpo"
# Each pipeline module declares its PIPELINE_NAME, TITLE (the display name in Kubeflow and the run summary) and
# STEPS: its KFP task names (a local run leaves one folder each) in the order they run, with what each is for.
TITLE = "teleguard seed 004: reward model, DPO, RM-ranked RSFT and PPO"
STEPS = {
    **SEED_STEPS,
    "rejection-sampling": "N samples per prompt",
    "reward-model": "preference pairs -> reward model",
    "dpo": "DPO on the pairs",
    "rm-ranked-rsft": "RM-ranked rejection sampling -> SFT",
    "ppo": "PPO against the reward model",
    "grpo-stage1": "GRPO (for comparison)",
    "export-model": "serving model (DPO)",
    "evaluate-recipe": "evaluation: DPO vs RM-RSFT vs PPO vs GRPO",
}


@dsl.pipeline(name=PIPELINE_NAME, description="Seed 004: reward model, DPO, RM-ranked RSFT and PPO vs GRPO")
def rm_dpo(
    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues",
    source_format: str = "dialogues",
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct",
    recipe: str = "/opt/teleguard/recipes/rm-dpo/qwen2-audio-7b.yaml",
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
    run_ppo: bool = True,
):
    pools = Pools(gpu_type, gpu_count, gpu_node_selector, gpu_tolerations, storage_secret)
    recipe_args = {"recipe": recipe, "recipe_overrides": recipe_overrides}
    audio, _, sft = warm_started(
        pools, data_uri=data_uri, source_format=source_format, base_model_uri=base_model_uri, recipe_args=recipe_args,
        prompts=prompts, max_transcript_chars=max_transcript_chars, evidence_chars=evidence_chars,
        use_audio=use_audio, run_warm_start_sft=run_warm_start_sft,
    )  # fmt: skip
    datasets = audio.outputs["datasets"]
    policy = sft.outputs["model"]
    samples = pools.gpu(rejection_sampling(datasets=datasets, policy=policy, **recipe_args)).outputs[
        "samples"
    ]
    rm = pools.gpu(reward_model(datasets=datasets, start=policy, samples=samples, **recipe_args))
    dpo_task = pools.gpu(dpo(enabled=True, datasets=datasets, start=policy, samples=samples, **recipe_args))
    rm_rsft = pools.gpu(
        rm_ranked_rsft(
            enabled=True,
            datasets=datasets,
            start=policy,
            samples=samples,
            reward=rm.outputs["model"],
            **recipe_args,
        )
    )
    ppo_task = pools.gpu(
        ppo(enabled=run_ppo, datasets=datasets, start=policy, reward=rm.outputs["model"], **recipe_args)
    )
    grpo = pools.gpu(
        grpo_stage1(
            enabled=True, datasets=datasets, start=policy, num_nodes=1, trainer_image="", gpu_type=gpu_type,
            gpu_count=gpu_count, gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations, **recipe_args,
        )
    )  # fmt: skip
    exported = pools.gpu(export_model(datasets=datasets, start=dpo_task.outputs["model"], **recipe_args))
    pools.gpu(
        evaluate_recipe(
            datasets=datasets, final_model=exported.outputs["model"], model_a=grpo.outputs["model"],
            model_b=rm_rsft.outputs["model"], model_c=ppo_task.outputs["model"], model_d=policy,
            names=["grpo", "rm_rsft", "ppo", "sft"], aux_model=policy, aux="", cascade_threshold=0.0, **recipe_args,
        )
    )  # fmt: skip
