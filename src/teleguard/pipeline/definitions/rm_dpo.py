"""Seed 004 as a teleguard recipe: a reward model, DPO, RM-ranked rejection sampling and PPO, next to GRPO.

data -> warm-start SFT -> N samples per prompt -> preference pairs (correct and short over wrong or long) ->
reward model (`swift rlhf --rlhf_type rm`) -> from the warm start, side by side: DPO on the pairs, SFT on the
samples the reward model ranks first, PPO against the reward model (KL coefficient, KL target checked), and the
GRPO path -> export (DPO) -> one report comparing them all.
"""

from teleguard.pipeline.components.recipes import dpo, ppo, reward_model, rm_ranked_rsft
from teleguard.pipeline.components.training import grpo_stage1, rejection_sampling
from teleguard.pipeline.definitions import shared
from teleguard.pipeline.definitions.shared import Parameters

DEFINITION = shared.Definition(
    name="teleguard-rm-dpo",
    title="teleguard seed 004: reward model, DPO, RM-ranked RSFT and PPO",
    description="Seed 004: reward model, DPO, RM-ranked RSFT and PPO vs GRPO",
    recipe="/opt/teleguard/recipes/rm-dpo/qwen2-audio-7b.yaml",
    optional=("run_warm_start_sft",),
    steps={
        **shared.PREPARE_STEPS,
        "rejection-sampling": "N samples per prompt",
        "reward-model": "preference pairs -> reward model",
        "dpo": "DPO on the pairs",
        "rm-ranked-rsft": "RM-ranked rejection sampling -> SFT",
        "ppo": "PPO against the reward model",
        "grpo-stage1": "GRPO (for comparison)",
        "export-model": "serving model (DPO)",
        "evaluate-recipe": "evaluation: DPO vs RM-RSFT vs PPO vs GRPO",
    },
)


@DEFINITION.pipeline
def rm_dpo(p: Parameters, run_ppo: bool = True) -> None:
    pools, recipe_args = p.pools, p.recipe_args
    prepared = shared.prepare(p)
    datasets, policy = prepared.datasets, prepared.sft.outputs["model"]
    sampling = rejection_sampling(enabled=True, datasets=datasets, policy=policy, **recipe_args)
    samples = pools.gpu(sampling).outputs["samples"]  # the reward model, DPO and the RM ranking all read them
    rm = pools.gpu(reward_model(datasets=datasets, start=policy, samples=samples, **recipe_args))
    dpo_task = pools.gpu(dpo(enabled=True, datasets=datasets, start=policy, samples=samples, **recipe_args))
    rm_rsft = pools.gpu(
        rm_ranked_rsft(
            enabled=True, datasets=datasets, start=policy, samples=samples, reward=rm.outputs["model"],
            **recipe_args,
        )
    )  # fmt: skip
    ppo_task = pools.gpu(
        ppo(enabled=run_ppo, datasets=datasets, start=policy, reward=rm.outputs["model"], **recipe_args)
    )
    grpo = pools.gpu(
        grpo_stage1(enabled=True, datasets=datasets, start=policy, **p.nodes_args(), **recipe_args)
    )
    compared = {
        "grpo": grpo.outputs["model"], "rm_rsft": rm_rsft.outputs["model"], "ppo": ppo_task.outputs["model"],
        "sft": policy,
    }  # fmt: skip
    shared.export_and_evaluate(p, datasets, dpo_task.outputs["model"], compared)
