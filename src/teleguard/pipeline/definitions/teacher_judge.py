"""Seed 001 as a teleguard recipe: GRPO whose reward mixes the rule rewards (0.6) with an LLM teacher judge (0.4).

data -> warm-start SFT -> GRPO (rule + teacher judge) -> export -> evaluation (held-out split, gold and red-team
sets). The judge is an OpenAI-compatible endpoint named in the recipe (an external API such as DeepSeek, or an
in-cluster vLLM); its key comes from the Secret `judge_secret` (key `api-key`). The CPU recipe serves a tiny
judge on loopback with `swift deploy` instead. Judgements are cached by content hash.
"""

from kfp import dsl, kubernetes

from teleguard.pipeline.components.training import grpo_stage1
from teleguard.pipeline.definitions import shared
from teleguard.pipeline.definitions.shared import Parameters

DEFINITION = shared.Definition(
    name="teleguard-teacher-judge",
    title="teleguard seed 001: rule + teacher-judge rewards",
    description="Seed 001: GRPO with rule rewards and a cached LLM teacher judge",
    recipe="/opt/teleguard/recipes/teacher-judge/qwen2-audio-7b.yaml",
    optional=("run_warm_start_sft",),
    steps={
        **shared.PREPARE_STEPS,
        "grpo-stage1": "GRPO: 0.6 rule + 0.4 teacher judge",
        "export-model": "serving model",
        "evaluate-recipe": "evaluation (held-out, gold, red-team)",
    },
)


def with_judge_key(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """The judge's API key from a Secret (key `api-key`), as the variable the judge reads; optional, so an
    in-cluster judge without a key needs no Secret."""
    kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env={"api-key": "TELEGUARD_JUDGE_API_KEY"}, optional=True
    )
    return task


@DEFINITION.pipeline
def teacher_judge(p: Parameters, judge_secret: str = "teleguard-judge") -> None:
    prepared = shared.prepare(p)
    sft_model = prepared.sft.outputs["model"]
    grpo = p.pools.gpu(
        grpo_stage1(
            enabled=True, datasets=prepared.datasets, start=sft_model, **p.nodes_args(), **p.recipe_args
        )
    )
    with_judge_key(grpo, judge_secret)
    shared.export_and_evaluate(p, prepared.datasets, grpo.outputs["model"], {"sft": sft_model})
