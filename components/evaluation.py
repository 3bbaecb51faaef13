"""Evaluation and the gated registration of the serving model."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from teleguard.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
    recipe: str,
    recipe_overrides: dict,
    datasets: Input[Dataset],
    final_model: Input[Model],
    stage1_model: Input[Model],
    rsft_model: Input[Model],
    lcrl_model: Input[Model],
    compare_stages: bool,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    report_md: Output[Markdown],
    details: Output[Dataset],
) -> str:
    """TeleAntiFraud metrics, real-time metrics and a report comparing the stages; returns the final model's
    figures (JSON) for the quality gate."""
    from pathlib import Path

    from teleguard.pipeline_steps import evaluate_step, log_evaluation

    models = {"final": Path(final_model.path)}
    if compare_stages:
        models = {
            "grpo": Path(stage1_model.path),
            "rsft": Path(rsft_model.path),
            "lcrl": Path(lcrl_model.path),
            **models,
        }
    results = evaluate_step(recipe, recipe_overrides, Path(datasets.path), models, Path(details.path))
    return log_evaluation(
        results["final"], Path(details.path), metrics, confusion, report.path, report_md.path
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def quality_gate(summary: str, min_fraud_accuracy: float, min_well_formed: float) -> bool:
    """Whether the final model may be registered: fraud accuracy and well-formed rate at or above thresholds."""
    import json

    from teleguard.pipeline_steps import quality_gate as passes

    passed = passes(json.loads(summary), min_fraud_accuracy, min_well_formed)
    print(f"quality gate {'passed' if passed else 'failed'}: {summary}")
    return passed


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def register_model(model: Input[Model], registry_uri: str, model_name: str, summary: str) -> str:
    """Register the serving model (runs only when the evaluation passed the quality gate)."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import register_step

    return register_step(Path(model.path), registry_uri, model_name, json.loads(summary or "{}"))
