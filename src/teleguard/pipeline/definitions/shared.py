"""What every pipeline definition shares: the parameters, the pool placement, and the sub-pipelines.

- `Parameters`: the pipeline parameters declared once (name, type, default). `Definition.pipeline` builds each
  variant's KFP signature from them plus the variant function's own parameters (KFP reads a pipeline's inputs
  from `inspect.signature`, which honours `__signature__`), and hands the variant a `Parameters` of channels.
- `Pools`: a task on the GPU pool or the default pool, with the storage settings.
- `prepare` (data -> audio -> start model -> warm start) and `export_and_evaluate` (the seed recipes' end):
  plain functions that add their tasks to the calling pipeline, so task names, the compiled graph and a local
  run's step folders are those of a pipeline written out in full.
"""

import contextlib
import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import pipeline_task
from kfp.dsl.pipeline_channel import PipelineChannel

from teleguard.pipeline.components.data import build_data, synthesize_audio
from teleguard.pipeline.components.recipes import evaluate_recipe
from teleguard.pipeline.components.training import export_model, start_model, warm_start_sft

DEFAULT_NODE_SELECTOR = {"teleguard.io/node-pool": "gpu"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
SHM_SIZE = "16Gi"  # NCCL and the data loaders need more than the container default of 64 MiB
GPU_CPU_REQUEST, GPU_MEMORY_REQUEST = "8", "64Gi"
CPU_CPU_REQUEST, CPU_MEMORY_REQUEST = "2", "8Gi"
STORAGE_CONFIG_MAP = "teleguard-storage"  # data: endpoint (e.g. http://minio.teleguard.svc:9000)
# The tasks of `prepare`, as a definition's STEPS lists them
PREPARE_STEPS = {
    "build-data": "ingest, split, build datasets (with the gold and red-team sets)",
    "synthesize-audio": "call audio (or text passed through)",
    "start-model": "base model",
    "warm-start-sft": "warm-start SFT",
}


@dataclass(frozen=True)
class Parameters:
    """The pipeline parameters, declared once. In a pipeline's body each field is its KFP channel; a parameter
    the pipeline does not expose (`OPTIONAL` ones it does not list) keeps the default below, a constant."""

    data_uri: str = "s3://teleguard/data/teleantifraud-dialogues"
    source_format: str = "dialogues"
    base_model_uri: str = "s3://teleguard/models/Qwen2-Audio-7B-Instruct"
    recipe: str = ""  # every definition names its own recipe (Definition.recipe)
    recipe_overrides: dict = field(default_factory=dict)
    prompts: str = ""
    max_transcript_chars: int = 0
    evidence_chars: int = 0
    use_audio: bool = True
    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 4
    gpu_node_selector: dict = field(default_factory=lambda: dict(DEFAULT_NODE_SELECTOR))
    gpu_tolerations: list = field(default_factory=lambda: [dict(t) for t in DEFAULT_TOLERATIONS])
    storage_secret: str = "teleguard-minio"
    # OPTIONAL: parameters of some pipelines only (Definition.optional)
    split_seed: int = 0
    audio_calls_limit: int = 0
    run_warm_start_sft: bool = False

    @property
    def recipe_args(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "recipe_overrides": self.recipe_overrides}

    @property
    def pools(self) -> "Pools":
        return Pools(
            self.gpu_type, self.gpu_count, self.gpu_node_selector, self.gpu_tolerations, self.storage_secret
        )

    def nodes_args(self, num_nodes: Any = 1, trainer_image: Any = "") -> dict[str, Any]:
        """A GRPO-type stage's node settings (teleguard.pipeline.artifacts.Nodes): one node, the step's own pod,
        unless `num_nodes` asks for a TrainJob; the step pod itself still lands on the GPU pool."""
        return {
            "num_nodes": num_nodes, "trainer_image": trainer_image, "gpu_type": self.gpu_type,
            "gpu_count": self.gpu_count, "gpu_node_selector": self.gpu_node_selector,
            "gpu_tolerations": self.gpu_tolerations,
        }  # fmt: skip


OPTIONAL = ("split_seed", "audio_calls_limit", "run_warm_start_sft")


def shared_parameters(recipe: str, optional: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The KFP parameters a definition takes from `Parameters`: every one but the OPTIONAL ones it leaves out,
    `recipe` defaulting to the definition's recipe."""
    unknown = set(optional) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"not optional parameters: {sorted(unknown)}; optional: {', '.join(OPTIONAL)}")
    hints = typing.get_type_hints(Parameters)
    params = []
    for f in dataclasses.fields(Parameters):
        if f.name in OPTIONAL and f.name not in optional:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        default = recipe if f.name == "recipe" else default
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=hints[f.name]
            )
        )
    return params


@dataclass(frozen=True)
class Definition:
    """A pipeline: its name (the KFP pipeline name), title (the display name in Kubeflow and the run summary),
    steps (its KFP task names, a local run's step folders, in the order they run, with what each is for),
    description, default recipe and the OPTIONAL shared parameters it exposes."""

    name: str
    title: str
    description: str
    recipe: str
    steps: Mapping[str, str]
    optional: tuple[str, ...] = ()

    def pipeline(self, body: Callable[..., None]) -> Any:
        """`body(p: Parameters, <own parameters with literal defaults>)` as a KFP pipeline whose parameters are
        the shared ones and then the body's own."""
        shared = shared_parameters(self.recipe, self.optional)
        own = list(inspect.signature(body).parameters.values())[1:]
        signature = inspect.Signature([*shared, *own])  # every parameter has a literal default, as KFP wants
        shared_names = {p.name for p in shared}

        def function(*args: Any, **kwargs: Any) -> None:
            # KFP calls a pipeline function with its channels positionally, in signature order
            bound = signature.bind(*args, **kwargs).arguments
            common = Parameters(**{k: v for k, v in bound.items() if k in shared_names})
            body(common, **{k: v for k, v in bound.items() if k not in shared_names})

        function.__signature__ = signature  # type: ignore[attr-defined]
        function.__name__ = function.__qualname__ = body.__name__
        function.__module__ = body.__module__
        with quick_caller_names():  # KFP builds the graph here
            return dsl.pipeline(name=self.name, description=self.description)(function)


@contextlib.contextmanager
def quick_caller_names() -> Iterator[None]:
    """While a pipeline graph is built, KFP's task setters look up their caller's name without source lines.

    kfp 2.17's `set_cpu_request`, `set_accelerator_type`, ... each call `inspect.stack()` only to name the caller
    in an error message, and that reads the source of every frame on the stack: with torch imported, most of
    the time it takes to build the pipelines (13 s of 19 s for all five, measured). `inspect.stack(0)` gives the
    same names without the source."""
    saved = pipeline_task.inspect
    pipeline_task.inspect = SimpleNamespace(stack=_stack_without_source)  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline_task.inspect = saved


def _stack_without_source() -> list[inspect.FrameInfo]:
    return inspect.stack(0)[1:]  # from the caller's frame, as `inspect.stack()` called there


class Pools:
    """Puts a task on the GPU pool or the default pool, with the storage settings."""

    def __init__(
        self, gpu_type: Any, gpu_count: Any, node_selector: Any, tolerations: Any, secret: Any
    ) -> None:
        self.gpu_type, self.gpu_count, self.secret = gpu_type, gpu_count, secret
        self.node_selector, self.tolerations = node_selector, tolerations

    def gpu(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        task = on_gpu_pool(task, self.gpu_type, self.gpu_count, self.node_selector, self.tolerations)
        return with_storage(task, self.secret)

    def cpu(self, task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
        return with_storage(on_cpu_pool(task, cache), self.secret)


def on_gpu_pool(
    task: dsl.PipelineTask, gpu_type: str, gpu_count: int, node_selector: dict, tolerations: list
) -> dsl.PipelineTask:
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    task.set_cpu_request(GPU_CPU_REQUEST).set_memory_request(GPU_MEMORY_REQUEST)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    # a preempted GPU node: retry; the stage resumes from its last checkpoint (a local run drops the retries:
    # see teleguard.pipeline.local.without_retries)
    task.set_retry(num_retries=2, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="1800s")
    return task.set_caching_options(False)


def on_cpu_pool(task: dsl.PipelineTask, cache: bool) -> dsl.PipelineTask:
    task.set_cpu_request(CPU_CPU_REQUEST).set_memory_request(CPU_MEMORY_REQUEST)
    return task.set_caching_options(cache)


def with_storage(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """S3/MinIO settings for teleguard's own reads and writes (s3:// data, registry, multi-node stages):
    keys from the Secret the KFP launcher uses too, the endpoint from the teleguard-storage ConfigMap.
    Both optional, so a pipeline on local or public data runs without them."""
    keys = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=STORAGE_CONFIG_MAP,
        config_map_key_to_env={"endpoint": "S3_ENDPOINT"},
        optional=True,
    )
    return task


@dataclass(frozen=True)
class Prepared:
    """The tasks of `prepare`."""

    data: dsl.PipelineTask  # build-data: its `calls` are the text calls of every split
    audio: dsl.PipelineTask  # synthesize-audio: its `datasets` are what every later step trains on
    base: dsl.PipelineTask  # start-model
    sft: dsl.PipelineTask  # warm-start-sft (switched off: the start model passed through)

    @property
    def datasets(self) -> PipelineChannel:
        return self.audio.outputs["datasets"]


def prepare(p: Parameters) -> Prepared:
    """Data, audio, start model and warm start (switched by `run_warm_start_sft`: off where a pipeline does not
    expose it)."""
    pools = p.pools
    data = pools.cpu(
        build_data(
            data_uri=p.data_uri, source_format=p.source_format, prompts=p.prompts,
            max_transcript_chars=p.max_transcript_chars, evidence_chars=p.evidence_chars, split_seed=p.split_seed,
        ),
        cache=True,
    ).set_display_name("build data")  # fmt: skip
    audio = pools.cpu(
        synthesize_audio(
            enabled=p.use_audio, calls=data.outputs["calls"], text_datasets=data.outputs["datasets"],
            limit=p.audio_calls_limit, prompts=p.prompts,
        ),
        cache=True,
    ).set_display_name("synthesize audio")  # fmt: skip
    # one component for both modalities: KFP's local runner cannot resolve a dsl.OneOf of two branches
    datasets = audio.outputs["datasets"]
    base = pools.cpu(
        start_model(base_model_uri=p.base_model_uri, datasets=datasets, **p.recipe_args), cache=True
    )
    base.set_display_name("start model")
    sft = pools.gpu(
        warm_start_sft(
            enabled=p.run_warm_start_sft, datasets=datasets, start=base.outputs["model"], **p.recipe_args
        )
    )
    return Prepared(data, audio, base, sft)


def export_and_evaluate(
    p: Parameters,
    datasets: PipelineChannel,
    final: PipelineChannel,
    compared: Mapping[str, PipelineChannel],
    *,
    aux: str = "",
    aux_model: PipelineChannel | None = None,
    cascade_threshold: Any = 0.0,
) -> dsl.PipelineTask:
    """Export `final` (the serving model) and evaluate it with up to four `compared` models (name -> model)
    and `aux` ("classifier" or "cascade", with `aux_model`). evaluate_recipe's unused model slots repeat the last
    compared model (else the aux model): KFP needs every input connected."""
    if len(compared) > 4:
        raise ValueError(f"evaluate_recipe compares up to 4 models, got {len(compared)}")
    pad = list(compared.values())[-1] if compared else aux_model
    if pad is None:
        raise ValueError("export_and_evaluate needs a compared model or an aux model")
    slots = [*compared.values(), *[pad] * (4 - len(compared))]
    pools = p.pools
    exported = pools.gpu(export_model(datasets=datasets, start=final, **p.recipe_args))
    return pools.gpu(
        evaluate_recipe(
            datasets=datasets, final_model=exported.outputs["model"], model_a=slots[0], model_b=slots[1],
            model_c=slots[2], model_d=slots[3], names=list(compared), aux_model=aux_model or pad, aux=aux,
            cascade_threshold=cascade_threshold, **p.recipe_args,
        )
    )  # fmt: skip
