"""Seed 002 as a teleguard recipe: a fraud classifier (sequence classification) as a GRPO reward.

data -> warm-start SFT -> fraud classifier (`swift sft --task_type seq_cls`) -> GRPO (format + the classifier's
probability of the gold verdict) -> export -> evaluation, whose report shows the classifier reward's mean and
spread before (the warm-started model) and after RL.
"""

from teleguard.pipeline.components.recipes import classifier_grpo, fraud_classifier
from teleguard.pipeline.definitions import shared
from teleguard.pipeline.definitions.shared import Parameters

DEFINITION = shared.Definition(
    name="teleguard-classifier-reward",
    title="teleguard seed 002: fraud-classifier reward",
    description="Seed 002: GRPO with a fraud-classifier reward",
    recipe="/opt/teleguard/recipes/classifier-reward/qwen2-audio-7b.yaml",
    optional=("run_warm_start_sft",),
    steps={
        **shared.PREPARE_STEPS,
        "fraud-classifier": "fraud classifier (seq_cls)",
        "classifier-grpo": "GRPO: format + classifier reward",
        "export-model": "serving model",
        "evaluate-recipe": "evaluation + classifier reward before/after",
    },
)


@DEFINITION.pipeline
def classifier_reward(p: Parameters) -> None:
    prepared = shared.prepare(p)
    datasets, sft_model = prepared.datasets, prepared.sft.outputs["model"]
    classifier = p.pools.gpu(fraud_classifier(datasets=datasets, start=sft_model, **p.recipe_args))
    grpo = p.pools.gpu(
        classifier_grpo(
            enabled=True, datasets=datasets, start=sft_model, classifier=classifier.outputs["model"],
            **p.recipe_args,
        )
    )  # fmt: skip
    shared.export_and_evaluate(
        p, datasets, grpo.outputs["model"], {"sft": sft_model}, aux="classifier",
        aux_model=classifier.outputs["model"],
    )  # fmt: skip
