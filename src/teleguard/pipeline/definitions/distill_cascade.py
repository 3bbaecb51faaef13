"""Seed 003 as a teleguard recipe: rationale distillation into a small student, and a confidence cascade.

data -> student start model, teacher model (a URI, or the recipe's teacher built on the spot and warm-started)
-> the teacher writes rationales for the training prompts -> the student is SFT-trained on them -> export ->
evaluation of the student, the teacher and the cascade (the student answers; answers below the confidence
threshold escalate to the teacher): escalation rate and accuracy with and without the cascade. The same
cascade runs in the detector (`teleguard serve --escalate-...`, docs/serving.md).
"""

from teleguard.pipeline.components.recipes import distill, teacher_model
from teleguard.pipeline.components.training import warm_start_sft
from teleguard.pipeline.definitions import shared
from teleguard.pipeline.definitions.shared import Parameters

DEFINITION = shared.Definition(
    name="teleguard-distill-cascade",
    title="teleguard seed 003: rationale distillation + cascade",
    description="Seed 003: rationale distillation and a confidence cascade",
    recipe="/opt/teleguard/recipes/distill-cascade/qwen2-audio-7b.yaml",
    steps={
        **shared.PREPARE_STEPS,
        "teacher-model": "teacher model",
        "warm-start-sft-2": "teacher warm start",
        "distill": "teacher rationales -> student SFT",
        "export-model": "serving model (student)",
        "evaluate-recipe": "evaluation + cascade",
    },
)


@DEFINITION.pipeline
def distill_cascade(
    p: Parameters,
    teacher_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-teleguard",
    warm_start_teacher: bool = False,
    cascade_threshold: float = 0.7,
) -> None:
    prepared = shared.prepare(
        p
    )  # the student's warm start stays off: run_warm_start_sft is not a parameter here
    datasets = prepared.datasets
    teacher = p.pools.cpu(
        teacher_model(teacher_model_uri=teacher_model_uri, datasets=datasets, **p.recipe_args), cache=True
    )
    teacher_sft = p.pools.gpu(
        warm_start_sft(
            enabled=warm_start_teacher, datasets=datasets, start=teacher.outputs["model"], **p.recipe_args
        )
    ).set_display_name("teacher warm start")
    student = p.pools.gpu(
        distill(
            enabled=True, datasets=datasets, start=prepared.base.outputs["model"],
            teacher=teacher_sft.outputs["model"], **p.recipe_args,
        )
    )  # fmt: skip
    shared.export_and_evaluate(
        p, datasets, student.outputs["model"], {}, aux="cascade", aux_model=teacher_sft.outputs["model"],
        cascade_threshold=cascade_threshold,
    )  # fmt: skip
