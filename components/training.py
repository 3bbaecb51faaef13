"""Training steps: the start model, one component per SAFE-QAQ stage, rejection sampling and selection, export.

Every stage component has `enabled`: switched off, it passes its input model through, so the pipeline's
graph stays the same whichever stages run.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from teleguard.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def start_model(
    recipe: str, recipe_overrides: dict, base_model_uri: str, datasets: Input[Dataset], model: Output[Model]
):
    """The model the pipeline starts from (the base model URI, or the recipe's tiny model built on the spot)."""
    from pathlib import Path

    from teleguard.pipeline_steps import start_model_step

    start_model_step(recipe, recipe_overrides, base_model_uri, Path(datasets.path), Path(model.path))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def warm_start_sft(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    model: Output[Model],
) -> str:  # fmt: skip
    """Warm-start SFT for a base model that never saw the task (`swift sft`)."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import train_stage_step

    return json.dumps(train_stage_step(
        "sft", enabled, recipe, recipe_overrides, Path(datasets.path), Path(start.path), Path(model.path)
    ), default=str)  # fmt: skip


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def grpo_stage1(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 1: rule-based GRPO (`swift rlhf --rlhf_type grpo`, adaptive classification + format). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline_steps import rl_stage_step

    return rl_stage_step(
        "grpo", enabled, recipe, recipe_overrides, datasets, start, model, num_nodes=num_nodes,
        image=trainer_image, gpu_type=gpu_type, gpus_per_node=gpu_count, node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
    )  # fmt: skip


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rejection_sampling(
    recipe: str,
    recipe_overrides: dict,
    datasets: Input[Dataset],
    policy: Input[Model],
    samples: Output[Dataset],
) -> int:
    """Stage 2a: N samples per training prompt through an inference engine (vLLM on GPU)."""
    from pathlib import Path

    from teleguard.pipeline_steps import sample_step

    return sample_step(recipe, recipe_overrides, Path(datasets.path), Path(policy.path), Path(samples.path))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def select_shortest_correct(samples: Input[Dataset], selection: Output[Dataset]) -> str:
    """Stage 2a: keep the shortest correct response per prompt; report prompts with none correct."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import select_step

    return json.dumps(select_step(Path(samples.path), Path(selection.path)))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rsft(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], selection: Input[Dataset],
    start: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """Stage 2b: SFT on the selected responses (`swift sft`)."""
    import json
    from pathlib import Path

    from teleguard.pipeline_steps import train_stage_step

    return json.dumps(train_stage_step(
        "rsft", enabled, recipe, recipe_overrides, Path(datasets.path), Path(start.path), Path(model.path),
        selection=Path(selection.path),
    ), default=str)  # fmt: skip


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def lcrl(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 2c: length-constrained GRPO (+ think-length penalty). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline_steps import rl_stage_step

    return rl_stage_step(
        "lcrl", enabled, recipe, recipe_overrides, datasets, start, model, num_nodes=num_nodes,
        image=trainer_image, gpu_type=gpu_type, gpus_per_node=gpu_count, node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
    )  # fmt: skip


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def realtime_grpo(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 3: real-time GRPO on streaming prefixes (+ stage reward). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline_steps import rl_stage_step

    return rl_stage_step(
        "realtime", enabled, recipe, recipe_overrides, datasets, start, model, num_nodes=num_nodes,
        image=trainer_image, gpu_type=gpu_type, gpus_per_node=gpu_count, node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
    )  # fmt: skip


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def export_model(
    recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model], model: Output[Model]
):
    """The serving model: LoRA merged into its base (`swift export --merge_lora true`), with its serving card."""
    from pathlib import Path

    from teleguard.pipeline_steps import train_stage_step

    train_stage_step(
        "export", True, recipe, recipe_overrides, Path(datasets.path), Path(start.path), Path(model.path)
    )
