"""Training steps: the start model, one component per SAFE-QAQ stage, rejection sampling and selection, export.

The stage components that a pipeline parameter switches (warm start, the GRPO stages, RSFT) take `enabled`:
switched off, the stage passes its input model through, so the pipeline's graph stays the same whichever stages
run. The start model, sampling, selection and export always run.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from teleguard.pipeline.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def start_model(
    recipe: str, recipe_overrides: dict, base_model_uri: str, datasets: Input[Dataset], model: Output[Model]
):
    """The model the pipeline starts from (the base model URI, or the recipe's tiny model built on the spot)."""
    from teleguard.pipeline.artifacts import path_of
    from teleguard.pipeline.steps.training import start_model_step

    start_model_step(recipe, recipe_overrides, base_model_uri, path_of(datasets), path_of(model))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def warm_start_sft(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    model: Output[Model],
) -> str:  # fmt: skip
    """Warm-start SFT for a base model that never saw the task (`swift sft`)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step("sft", enabled, recipe, recipe_overrides, datasets, start, model)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def grpo_stage1(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 1: rule-based GRPO (`swift rlhf --rlhf_type grpo`, adaptive classification + format). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline.artifacts import Nodes, stage_step

    nodes = Nodes(num_nodes, trainer_image, gpu_type, gpu_count, gpu_node_selector, gpu_tolerations)
    return stage_step("grpo", enabled, recipe, recipe_overrides, datasets, start, model, nodes=nodes)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rejection_sampling(
    enabled: bool,
    recipe: str,
    recipe_overrides: dict,
    datasets: Input[Dataset],
    policy: Input[Model],
    samples: Output[Dataset],
) -> int:
    """Stage 2a: N samples per training prompt through an inference engine (vLLM on GPU); switched off, none."""
    from teleguard.pipeline.artifacts import path_of
    from teleguard.pipeline.steps.training import sample_step

    return sample_step(
        enabled, recipe, recipe_overrides, path_of(datasets), path_of(policy), path_of(samples)
    )


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def select_shortest_correct(samples: Input[Dataset], selection: Output[Dataset]) -> str:
    """Stage 2a: keep the shortest correct response per prompt; report prompts with none correct."""
    from teleguard.pipeline.artifacts import as_json, path_of
    from teleguard.pipeline.steps.training import select_step

    return as_json(select_step(path_of(samples), path_of(selection)))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rsft(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], selection: Input[Dataset],
    start: Input[Model], model: Output[Model],
) -> str:  # fmt: skip
    """Stage 2b: SFT on the selected responses (`swift sft`)."""
    from teleguard.pipeline.artifacts import stage_step

    return stage_step("rsft", enabled, recipe, recipe_overrides, datasets, start, model, selection=selection)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def lcrl(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 2c: length-constrained GRPO (+ think-length penalty). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline.artifacts import Nodes, stage_step

    nodes = Nodes(num_nodes, trainer_image, gpu_type, gpu_count, gpu_node_selector, gpu_tolerations)
    return stage_step("lcrl", enabled, recipe, recipe_overrides, datasets, start, model, nodes=nodes)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def realtime_grpo(
    enabled: bool, recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model],
    num_nodes: int, trainer_image: str, gpu_type: str, gpu_count: int, gpu_node_selector: dict,
    gpu_tolerations: list, model: Output[Model],
) -> str:  # fmt: skip
    """Stage 3: real-time GRPO on streaming prefixes (+ stage reward). With num_nodes > 1, a TrainJob on that many GPU nodes."""
    from teleguard.pipeline.artifacts import Nodes, stage_step

    nodes = Nodes(num_nodes, trainer_image, gpu_type, gpu_count, gpu_node_selector, gpu_tolerations)
    return stage_step("realtime", enabled, recipe, recipe_overrides, datasets, start, model, nodes=nodes)


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def export_model(
    recipe: str, recipe_overrides: dict, datasets: Input[Dataset], start: Input[Model], model: Output[Model]
):
    """The serving model: LoRA merged into its base (`swift export --merge_lora true`), with its serving card."""
    from teleguard.pipeline.artifacts import stage_step

    stage_step("export", True, recipe, recipe_overrides, datasets, start, model)
