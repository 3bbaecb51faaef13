"""Evaluation and the gated registration of the serving model."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from teleguard.pipeline.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
    recipe: str,
    recipe_overrides: dict,
    datasets: Input[Dataset],
    calls: Input[Dataset],
    audio_calls: Input[Dataset],
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
    """Offline TeleAntiFraud metrics of the stages' models, and the exported model as deployed: held-out calls
    replayed live through the detector with its serving profile, next to a TF-IDF baseline; returns the final
    model's figures (JSON) for the quality gate."""
    from teleguard.pipeline.artifacts import path_of, paths_of
    from teleguard.pipeline.steps.evaluation import evaluate_with_live_step, log_evaluation

    models = {"final": final_model}
    if compare_stages:
        models = {"grpo": stage1_model, "rsft": rsft_model, "lcrl": lcrl_model, **models}
    results = evaluate_with_live_step(
        recipe, recipe_overrides, path_of(datasets), path_of(calls), paths_of(models), path_of(details),
        audio_calls=path_of(audio_calls),
    )  # fmt: skip
    return log_evaluation(results["final"], path_of(details), metrics, confusion, report.path, report_md.path)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def quality_gate(
    summary: str,
    min_live_accuracy: float,
    max_false_alarm_rate: float,
    min_live_fraud_type_accuracy: float,
    min_flagged_within_half: float,
    min_well_formed: float,
) -> bool:
    """Whether the final model may be registered: its live figures on held-out calls (verdict accuracy, false
    alarms on normal calls, fraud type, early detection) and its well-formed rate against the thresholds."""
    import json

    from teleguard.pipeline.steps.registration import gate_checks

    thresholds = {
        "min_live_accuracy": min_live_accuracy,
        "max_false_alarm_rate": max_false_alarm_rate,
        "min_live_fraud_type_accuracy": min_live_fraud_type_accuracy,
        "min_flagged_within_half": min_flagged_within_half,
        "min_well_formed": min_well_formed,
    }
    checks = gate_checks(json.loads(summary), thresholds)
    for c in checks:
        sign = ">=" if c["kind"] == "min" else "<="
        print(f"{'pass' if c['passed'] else 'FAIL'}: {c['figure']} {c['value']} {sign} {c['limit']}")
    passed = all(c["passed"] for c in checks)
    print(f"quality gate {'passed' if passed else 'failed'}")
    return passed


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def register_model(model: Input[Model], registry_uri: str, model_name: str, summary: str) -> str:
    """Register the serving model (runs only when the evaluation passed the quality gate)."""
    import json

    from teleguard.pipeline.artifacts import path_of
    from teleguard.pipeline.steps.registration import register_step

    return register_step(path_of(model), registry_uri, model_name, json.loads(summary or "{}"))
