"""Steps of the seed recipes (teleguard.pipeline.definitions: teacher_judge, classifier_reward, distill_cascade,
rm_dpo): classifier reward, distillation, reward model, DPO and PPO.

Thin like the SAFE-QAQ steps: each hands its artifacts to `teleguard.pipeline.artifacts.stage_step` (or to the
evaluation). A switched-off stage passes its input model through.
"""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from teleguard.pipeline.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def fraud_classifier(
    recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model], model: Output[Model]
) -> str:
    """A fraud classifier (`swift sft --task_type seq_cls`) for the fraud_classifier reward (seed 002)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step("classifier", True, recipe, recipe_overrides, datasets, start, model)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def classifier_grpo(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    classifier: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """GRPO whose rewards include the fraud classifier's probability of the gold verdict (seed 002)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step(
        "grpo",
        enabled,
        recipe,
        recipe_overrides,
        datasets,
        start,
        model,
        side_models={"classifier": classifier},
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def teacher_model(
    recipe: str,
    recipe_overrides: dict,
    teacher_model_uri: str,
    datasets: Input[Dataset],
    model: Output[Model],
):
    """The distillation teacher: `teacher_model_uri`, or the recipe's teacher (a tiny one built on the spot)."""
    from teleguard.pipeline.artifacts import path_of
    from teleguard.pipeline.steps.training import teacher_model_step

    teacher_model_step(recipe, recipe_overrides, teacher_model_uri, path_of(datasets), path_of(model))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def distill(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    teacher: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """The teacher writes rationales for the training prompts; the student is SFT-trained on them (seed 003)."""
    from teleguard.pipeline.artifacts import stage_step

    overrides = {**recipe_overrides, "stages.distill.teacher.path": teacher.path}
    return stage_step("distill", enabled, recipe, overrides, datasets, start, model)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def reward_model(
    recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model], samples: Input[Dataset],
    model: Output[Model],
) -> str:  # fmt: skip
    """A reward model (`swift rlhf --rlhf_type rm`) on preference pairs from the sampled responses (seed 004)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step(
        "rm", True, recipe, recipe_overrides, datasets, start, model, inputs={"sample": samples}
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def dpo(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    samples: Input[Dataset], model: Output[Model],
) -> str:  # fmt: skip
    """DPO (`swift rlhf --rlhf_type dpo`) on the same preference pairs (seed 004)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step(
        "dpo", enabled, recipe, recipe_overrides, datasets, start, model, inputs={"sample": samples}
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rm_ranked_rsft(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    samples: Input[Dataset], reward: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """Rejection sampling ranked by the reward model, then SFT on the picks (seed 004)."""
    from teleguard.pipeline.artifacts import stage_step

    overrides = {**recipe_overrides, "stages.rsft.selection": "reward_model"}
    return stage_step(
        "rsft",
        enabled,
        recipe,
        overrides,
        datasets,
        start,
        model,
        inputs={"sample": samples},
        side_models={"rm": reward},
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def ppo(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    reward: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """PPO against the reward model with a KL coefficient; the mean KL is checked against the target."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step(
        "ppo", enabled, recipe, recipe_overrides, datasets, start, model, side_models={"rm": reward}
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate_recipe(
    recipe: str,
    recipe_overrides: dict,
    datasets: Input[Dataset],
    final_model: Input[Model],
    model_a: Input[Model],
    model_b: Input[Model],
    model_c: Input[Model],
    model_d: Input[Model],
    names: list,
    aux_model: Input[Model],
    aux: str,
    cascade_threshold: float,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    report_md: Output[Markdown],
    details: Output[Dataset],
) -> str:
    """Evaluate the final model and up to three others (named by `names`, in order a, b, c, d) on the held-out split
    and the gold and red-team sets. `aux` adds: "classifier" (aux_model is the fraud classifier: its reward before
    and after RL), "cascade" (aux_model is the large model: the cascade's escalation rate and accuracy)."""
    from teleguard.pipeline.artifacts import path_of, paths_of
    from teleguard.pipeline.steps.evaluation import evaluate_recipe_step, log_evaluation

    others = (model_a, model_b, model_c, model_d)
    models = dict(zip(names, others, strict=False))  # unused slots repeat a model
    models["final"] = final_model
    cascade = None
    if aux == "cascade":
        models["large"] = aux_model
        cascade = ("final", "large", cascade_threshold)
    results = evaluate_recipe_step(
        recipe, recipe_overrides, path_of(datasets), paths_of(models), path_of(details),
        classifier=path_of(aux_model) if aux == "classifier" else None, cascade=cascade,
    )  # fmt: skip
    return log_evaluation(results["final"], path_of(details), metrics, confusion, report.path, report_md.path)
