"""Seed 003 as a teleguard recipe: rationale distillation into a small student, and a confidence cascade.

data -> student start model, teacher model (a URI, or the recipe's teacher built on the spot and warm-started)
-> the teacher writes rationales for the training prompts -> the student is SFT-trained on them -> export ->
evaluation of the student, the teacher and the cascade (the student answers; answers below the confidence
threshold escalate to the teacher): escalation rate and accuracy with and without the cascade. The same
cascade runs in the detector (`teleguard serve --escalate-...`, docs/serving.md).
"""

from kfp import dsl

from teleguard.components.recipes import distill, evaluate_recipe, teacher_model
from teleguard.components.training import export_model, warm_start_sft
from teleguard.pipelines.seed_common import (
    DEFAULT_NODE_SELECTOR,
    DEFAULT_TOLERATIONS,
    SEED_STEPS,
    Pools,
    warm_started,
)

PIPELINE_NAME = "teleguard-distill-cascade"
# Each pipeline module declares its PIPELINE_NAME, TITLE (the display name in Kubeflow and the run summary) and
# STEPS: its KFP task names (a local run leaves one folder each) in the order they run, with what each is for.
TITLE = "teleguard seed 003: rationale distillation + cascade"
STEPS = {
    **SEED_STEPS,
    "teacher-model": "teacher model",
    "warm-start-sft-2": "teacher warm start",
    "distill": "teacher rationales -> student SFT",
    "export-model": "serving model (student)",
    "evaluate-recipe": "evaluation + cascade",
}


@dsl.pipeline(name=PIPELINE_NAME, description="Seed 003: rationale distillation and a confidence cascade")
def distill_cascade(
    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues",
    source_format: str = "dialogues",
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct",
    teacher_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-teleguard",
    recipe: str = "/opt/teleguard/recipes/distill-cascade/qwen2-audio-7b.yaml",
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
    warm_start_teacher: bool = False,
    cascade_threshold: float = 0.7,
):
    pools = Pools(gpu_type, gpu_count, gpu_node_selector, gpu_tolerations, storage_secret)
    recipe_args = {"recipe": recipe, "recipe_overrides": recipe_overrides}
    audio, base, _ = warm_started(
        pools, data_uri=data_uri, source_format=source_format, base_model_uri=base_model_uri, recipe_args=recipe_args,
        prompts=prompts, max_transcript_chars=max_transcript_chars, evidence_chars=evidence_chars,
        use_audio=use_audio, run_warm_start_sft=False,
    )  # fmt: skip
    datasets = audio.outputs["datasets"]
    teacher = pools.cpu(
        teacher_model(teacher_model_uri=teacher_model_uri, datasets=datasets, **recipe_args), cache=True
    )
    teacher_sft = pools.gpu(
        warm_start_sft(
            enabled=warm_start_teacher, datasets=datasets, start=teacher.outputs["model"], **recipe_args
        )
    ).set_display_name("teacher warm start")
    student = pools.gpu(
        distill(
            enabled=True, datasets=datasets, start=base.outputs["model"], teacher=teacher_sft.outputs["model"],
            **recipe_args,
        )
    )  # fmt: skip
    exported = pools.gpu(export_model(datasets=datasets, start=student.outputs["model"], **recipe_args))
    large = teacher_sft.outputs["model"]
    pools.gpu(
        evaluate_recipe(
            datasets=datasets, final_model=exported.outputs["model"], model_a=large, model_b=large, model_c=large,
            model_d=large, names=[], aux_model=large, aux="cascade", cascade_threshold=cascade_threshold,
            **recipe_args,
        )
    )  # fmt: skip
