"""Recipes: one typed, validated configuration for every SAFE-QAQ stage.

A recipe file (YAML) names the model, the datasets (built by `teleguard data build`), where stage outputs go,
the ms-swift options every stage shares, and each stage's own settings. The same file drives a local run
(`teleguard train STAGE --config recipe.yaml`) and a pipeline run. It is validated once, when loaded: unknown
keys and impossible values are rejected with the file and the field before anything starts.

Stage chain (each stage starts from the model the previous enabled stage produced):

    sft (warm start, optional) -> grpo (stage 1) -> sample (2a) -> rsft (2b) -> lcrl (2c) -> realtime (3) -> export
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from teleguard.rewards import REWARDS
from teleguard.yaml_files import field_errors, read_mapping

STAGES = ("sft", "grpo", "sample", "rsft", "lcrl", "realtime", "export")
Stage = Literal["sft", "grpo", "sample", "rsft", "lcrl", "realtime", "export"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Config):
    """Build the start model on the spot (CPU recipes, tests) when `model.path` does not exist yet."""

    arch: Literal["qwen2", "qwen3", "qwen2_audio"] = "qwen2"
    hidden_size: int = Field(default=64, ge=16, multiple_of=16)
    num_layers: int = Field(default=2, ge=1, le=48)
    vocab_size: int = Field(default=2048, ge=300)
    corpus: list[str] = Field(
        default_factory=list,
        description="text/JSONL files (glob patterns) for the tokenizer; relative ones are read in data.datasets",
    )
    corpus_limit: int | None = Field(default=20_000, ge=1)
    seed: int = 0


class ModelConfig(_Config):
    path: str = Field(description="model folder (or s3:// URI) the first enabled stage starts from")
    model_type: str = Field(description="ms-swift --model_type, e.g. qwen2_audio")
    template: str = Field(description="ms-swift --template, e.g. qwen2_audio")
    build_tiny: TinyModelSpec | None = None


class DataConfig(_Config):
    datasets: str = Field(description="folder (or s3:// URI) written by `teleguard data build`")
    modality: Literal["text", "audio"] = "text"
    train_split: str = "train"
    eval_split: str = "test"


class Common(_Config):
    """ms-swift options shared by every training stage."""

    tuner_type: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(default=32, ge=1)
    lora_alpha: int = Field(default=64, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    torch_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    deepspeed: Literal["zero0", "zero1", "zero2", "zero3"] | None = None
    gradient_checkpointing: bool = True
    max_length: int = Field(default=8192, ge=64)
    dataloader_num_workers: int = Field(default=4, ge=0)
    seed: int = 42
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int = Field(default=3, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    report_to: str = "none"
    enable_thinking: bool | None = Field(default=None, description="for hybrid-thinking templates (qwen3)")
    extra: dict[str, Any] = Field(default_factory=dict, description="further ms-swift flags, passed as given")


class Schedule(_Config):
    enabled: bool = True
    learning_rate: float = Field(gt=0, lt=1)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="overrides epochs when set")
    per_device_train_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    limit: int | None = Field(default=None, ge=1, description="use only the first N dataset rows")
    extra: dict[str, Any] = Field(default_factory=dict)


class SftStage(Schedule):
    enabled: bool = False  # the warm start is only for a base model that never saw the task
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)


class RsftStage(Schedule):
    """Stage 2b: SFT on the responses stage 2a kept."""

    learning_rate: float = Field(default=5e-5, gt=0, lt=1)


class VllmRollout(_Config):
    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=64)
    tensor_parallel_size: int = Field(default=1, ge=1)


class GrpoStage(Schedule):
    learning_rate: float = Field(default=3e-5, gt=0, lt=1)
    reward_funcs: list[str] = Field(default_factory=lambda: ["adaptive_classification", "prompt_format"])
    reward_weights: list[float] | None = None
    num_generations: int = Field(default=9, ge=2)
    temperature: float = Field(default=0.9, gt=0, le=2)
    max_completion_length: int = Field(default=2048, ge=8)
    beta: float | None = Field(
        default=None, ge=0, description="KL coefficient (ms-swift's default when unset)"
    )
    use_vllm: bool = True
    vllm: VllmRollout = VllmRollout()
    dataset: Literal["grpo", "realtime"] = "grpo"

    @model_validator(mode="after")
    def _check(self) -> GrpoStage:
        unknown = [name for name in self.reward_funcs if name not in REWARDS]
        if unknown:
            raise ValueError(f"unknown reward_funcs {unknown}; known: {', '.join(REWARDS)}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )
        return self


class LcrlStage(GrpoStage):
    """Stage 2c: length-constrained GRPO."""

    reward_funcs: list[str] = Field(
        default_factory=lambda: ["adaptive_classification", "prompt_format", "think_length_penalty_200"]
    )


class RealtimeStage(GrpoStage):
    """Stage 3: GRPO on streaming prefixes labelled with their conversation stage."""

    dataset: Literal["grpo", "realtime"] = "realtime"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    reward_funcs: list[str] = Field(
        default_factory=lambda: ["adaptive_classification", "prompt_format", "stage_classification"]
    )


class SampleStage(_Config):
    """Stage 2a: N samples per prompt, keep the shortest correct one."""

    enabled: bool = True
    engine: Literal["transformers", "vllm"] = "vllm"
    num_samples: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.8, gt=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int | None = Field(default=50, ge=1)
    max_tokens: int = Field(default=2048, ge=8)
    limit: int | None = Field(default=None, ge=1, description="sample only the first N prompts")
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0


class ExportStage(_Config):
    enabled: bool = True
    merge_lora: bool = True


class EvaluateConfig(_Config):
    engine: Literal["transformers", "vllm"] = "vllm"
    max_tokens: int = Field(default=2048, ge=8)
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N rows of each file")
    realtime: bool = True
    alert_threshold: float = Field(default=0.0, ge=0, le=1)
    batch_size: int = Field(default=16, ge=1)


class Stages(_Config):
    sft: SftStage = SftStage()
    grpo: GrpoStage = GrpoStage()
    sample: SampleStage = SampleStage()
    rsft: RsftStage = RsftStage()
    lcrl: LcrlStage = LcrlStage()
    realtime: RealtimeStage = RealtimeStage()
    export: ExportStage = ExportStage()


class Recipe(_Config):
    name: str = Field(min_length=1)
    description: str = ""
    model: ModelConfig
    data: DataConfig
    output_dir: str = Field(description="stage outputs go to <output_dir>/<stage> (local path or s3:// URI)")
    device: Literal["cpu", "gpu"] = "gpu"
    common: Common = Common()
    stages: Stages = Stages()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.device == "cpu":
            if self.common.torch_dtype != "float32":
                raise ValueError("common.torch_dtype must be float32 when device is cpu")
            if self.common.deepspeed is not None:
                raise ValueError("common.deepspeed needs GPUs: set it to null when device is cpu")
            for name in ("grpo", "lcrl", "realtime"):
                if getattr(self.stages, name).use_vllm:
                    raise ValueError(
                        f"stages.{name}.use_vllm needs a GPU: set it to false when device is cpu"
                    )
            if self.stages.sample.engine == "vllm" or self.evaluate.engine == "vllm":
                raise ValueError("the vllm engine needs a GPU: use engine: transformers when device is cpu")
        if self.stages.rsft.enabled and not self.stages.sample.enabled:
            raise ValueError(
                "stages.rsft trains on what stages.sample selects: enable sample or disable rsft"
            )
        return self

    def enabled(self) -> list[str]:
        return [name for name in STAGES if getattr(self.stages, name).enabled]


class RecipeError(ValueError):
    """A recipe that cannot be used: names the file and every wrong field."""


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; `overrides` ({"stages.grpo.max_steps": 2, ...}) are applied first."""
    path = Path(path)
    raw = read_mapping(path, "recipe", RecipeError)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{path}: override {dotted!r}: {key!r} is not a section")
        node[leaf] = value
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = "\n".join(f"  {line}" for line in field_errors(err))
        raise RecipeError(f"{path}: invalid recipe:\n{problems}") from err
