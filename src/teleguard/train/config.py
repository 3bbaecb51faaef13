"""Recipes: one typed, validated configuration for every SAFE-QAQ stage.

A recipe file (YAML) names the model, the datasets (built by `teleguard data build`), where stage outputs go,
the ms-swift options every stage shares, and each stage's own settings. The same file drives a local run
(`teleguard train STAGE --config recipe.yaml`) and a pipeline run. It is validated once, when loaded: unknown
keys and impossible values are rejected with the file and the field before anything starts.

Stage chain (each stage starts from the model the previous enabled stage produced):

    sft (warm start, optional) -> grpo (stage 1) -> sample (2a) -> rsft (2b) -> lcrl (2c) -> realtime (3) -> export

The other seed systems add stages, all off by default (recipes/ turns them on):

    classifier   a fraud classifier (sequence classification) for the `fraud_classifier` reward   (seed 002)
    distill      SFT on rationales a teacher model wrote for the training prompts                  (seed 003)
    rm           a reward model trained on preference pairs from the sampled responses              (seed 004)
    dpo          DPO on the same pairs                                                              (seed 004)
    ppo          PPO against the reward model, with a KL coefficient and a KL target               (seeds 001, 002)

`classifier` and `rm` are side stages: they train a model other stages use, and the policy chain passes them by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from teleguard.rewards import REWARDS
from teleguard.yaml_files import field_errors, read_mapping

STAGES = (
    "sft", "classifier", "distill", "grpo", "sample", "rm", "rsft", "dpo", "ppo", "lcrl", "realtime", "export",
)  # fmt: skip
SIDE_STAGES = ("classifier", "rm")  # they train a model for other stages; the next policy stage skips them
Stage = Literal[
    "sft", "classifier", "distill", "grpo", "sample", "rm", "rsft", "dpo", "ppo", "lcrl", "realtime", "export"
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Config):
    """Build the start model on the spot (CPU recipes, tests) when `model.path` does not exist yet."""

    arch: Literal["qwen2", "qwen3", "qwen2_audio"] = "qwen2"
    hidden_size: int = Field(default=64, ge=16, multiple_of=16)
    # 16 is what the CPU recipes train; vLLM's CPU build runs 32, 64, 80, ... (hidden_size 128, head_dim 64)
    head_dim: int = Field(default=16, ge=16, multiple_of=16)
    num_layers: int = Field(default=2, ge=1, le=48)
    vocab_size: int = Field(default=2048, ge=300)
    corpus: list[str] = Field(
        default_factory=list,
        description="text/JSONL files (glob patterns) for the tokenizer; relative ones are read in data.datasets",
    )
    corpus_limit: int | None = Field(default=20_000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _whole_heads(self) -> TinyModelSpec:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size must be a multiple of head_dim ({self.head_dim})")
        return self


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
    selection: Literal["rule", "reward_model"] = Field(
        default="rule",
        description="rule: the shortest correct sample; reward_model: the sample the rm stage's model ranks first",
    )


class ClassifierStage(Schedule):
    """A fraud classifier (`swift sft --task_type seq_cls`) whose probability is the `fraud_classifier` reward."""

    enabled: bool = False
    learning_rate: float = Field(default=1e-4, gt=0, lt=1)


class TeacherModel(_Config):
    """The model that writes rationales (a folder or s3:// URI; a tiny one is built when so configured)."""

    path: str
    model_type: str | None = Field(default=None, description="default: the recipe's model.model_type")
    template: str | None = Field(default=None, description="default: the recipe's model.template")
    build_tiny: TinyModelSpec | None = None


class DistillStage(Schedule):
    """SFT on teacher-written rationales (the teacher sees the gold answer and explains it)."""

    enabled: bool = False
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    teacher: TeacherModel | None = None
    engine: Literal["transformers", "vllm"] = "vllm"
    max_tokens: int = Field(default=1024, ge=8)
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_rationale_chars: int = Field(default=2000, ge=20)
    rows: int | None = Field(
        default=None, ge=1, description="teacher rationales for the first N training prompts"
    )
    batch_size: int = Field(default=16, ge=1)


class PreferenceStage(Schedule):
    """Shared by the reward model and DPO: pairs from the sample stage's responses (teleguard.train.preferences)."""

    length_ratio: float = Field(default=1.5, ge=1, description="a correct answer this much longer is 'long'")


class RmStage(PreferenceStage):
    enabled: bool = False
    learning_rate: float = Field(default=1e-5, gt=0, lt=1)


class DpoStage(PreferenceStage):
    enabled: bool = False
    learning_rate: float = Field(default=5e-6, gt=0, lt=1)
    beta: float = Field(default=0.1, gt=0, description="DPO's beta (strength of the reference constraint)")


class PpoStage(Schedule):
    """PPO against the rm stage's reward model. ms-swift (TRL's PPOTrainer) keeps the KL coefficient fixed during a
    run; `target_kl` is checked after it: the stage's metrics say whether the mean KL stayed under the target."""

    enabled: bool = False
    learning_rate: float = Field(default=1e-6, gt=0, lt=1)
    kl_coef: float = Field(default=0.05, ge=0)
    target_kl: float | None = Field(default=0.1, gt=0)
    max_completion_length: int = Field(default=1024, ge=8)
    temperature: float = Field(default=0.7, gt=0, le=2)
    dataset: Literal["grpo", "realtime"] = "grpo"


class VllmRollout(_Config):
    """GRPO's rollouts with vLLM (`use_vllm`). On a CPU (vLLM's CPU build): colocate mode, one engine per
    training process, and a model whose attention heads vLLM's CPU build runs (64 wide, not 16; checked when
    the stage starts); teleguard adds the plugin that syncs the trained weights into vLLM's CPU model
    (`teleguard.plugins.swift_vllm_cpu`)."""

    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=64)
    tensor_parallel_size: int = Field(default=1, ge=1)

    def check_cpu(self, where: str) -> None:
        """ValueError for settings vLLM's rollouts cannot have on a CPU."""
        if self.mode == "server":
            raise ValueError(
                f"{where}.vllm.mode server needs a GPU: ms-swift's rollout server receives the trained weights "
                "over NCCL (vLLM's PyNcclCommunicator), which a CPU does not have; use mode colocate when "
                "device is cpu"
            )
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"{where}.vllm.tensor_parallel_size must be 1 when device is cpu (colocated vLLM on the CPU "
                "runs one engine per training process; tensor parallelism across CPU processes is untested)"
            )


class LocalJudge(_Config):
    """Serve the judge on loopback with `swift deploy` for the stage's duration (CPU runs and tests)."""

    model: str = Field(default="start", description="a model folder or URI; 'start': the stage's start model")
    model_type: str | None = None
    template: str | None = None


class TeacherJudge(_Config):
    """The `teacher_judge` reward's LLM judge (teleguard.rewards.judge.JudgeConfig fields under `endpoint`)."""

    endpoint: dict[str, Any] = Field(default_factory=dict)
    serve: LocalJudge | None = None

    @model_validator(mode="after")
    def _check(self) -> TeacherJudge:
        self.judge_config("http://127.0.0.1:1/v1" if self.serve else None)  # validates the endpoint's fields
        return self

    def judge_config(self, base_url: str | None = None, cache: str | None = None) -> Any:
        from teleguard.rewards.judge import JudgeConfig

        fields = {"model": "judge", **self.endpoint}
        if base_url:
            fields["base_url"] = base_url
        if cache and not fields.get("cache"):
            fields["cache"] = cache
        return JudgeConfig.model_validate(fields)


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
    judge: TeacherJudge | None = Field(default=None, description="needed by the teacher_judge reward")

    @model_validator(mode="after")
    def _check(self) -> GrpoStage:
        unknown = [name for name in self.reward_funcs if name not in REWARDS]
        if unknown:
            raise ValueError(f"unknown reward_funcs {unknown}; known: {', '.join(REWARDS)}")
        if "teacher_judge" in self.reward_funcs and self.judge is None:
            raise ValueError("reward teacher_judge needs a judge section (endpoint and/or serve)")
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


class LiveEvaluation(_Config):
    """The deployed detector on the held-out calls: each replayed turn by turn through the serving code with the
    exported model's serving profile (teleguard.evaluate.live), next to a TF-IDF baseline."""

    enabled: bool = True
    limit: int | None = Field(
        default=None, ge=1, description="replay only N held-out calls (a stratified pick)"
    )
    concurrency: int = Field(
        default=32, ge=1, description="calls in flight at once (the engine batches them)"
    )
    max_batch_size: int = Field(default=32, ge=1, description="requests per batched engine call")
    exact_sweep: bool = Field(
        default=True,
        description="keep evaluating after an alert, so the alert-threshold sweep is exact (more model calls)",
    )
    max_false_alarm_rate: float = Field(default=0.05, ge=0, le=1, description="for the suggested threshold")
    baseline: bool = True


class EvaluateConfig(_Config):
    engine: Literal["transformers", "vllm"] = "vllm"
    max_tokens: int = Field(default=2048, ge=8)
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N rows of each file")
    realtime: bool = True
    alert_threshold: float = Field(default=0.0, ge=0, le=1)
    batch_size: int = Field(default=16, ge=1)
    eval_sets: bool = Field(
        default=True, description="also evaluate the sets under <datasets>/eval_sets (docs/eval-sets.md)"
    )
    live: LiveEvaluation = LiveEvaluation()


class ServingConfig(_Config):
    """How the detector asks the exported model (its serving profile, teleguard.serve.profile): the policy
    points and the alert threshold. Language, prompts and the transcript window come from the data build."""

    every_seconds: float | None = Field(
        default=None, gt=0, description="evaluate every N s of new call audio"
    )
    on_turn: bool = Field(default=True, description="evaluate at each finished turn")
    min_turns: int = Field(default=1, ge=0, description="evaluate from this many finished turns")
    ask_scene: Literal["always", "until_known", "when_normal", "never"] = "when_normal"
    alert_threshold: float = Field(default=0.5, ge=0, le=1)
    max_tokens: int | None = Field(
        default=None, ge=8, description="tokens per answer; default evaluate.max_tokens"
    )

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.every_seconds is None and not self.on_turn:
            raise ValueError("set every_seconds or on_turn: otherwise the detector never evaluates a call")
        return self


class Stages(_Config):
    sft: SftStage = SftStage()
    classifier: ClassifierStage = ClassifierStage()
    distill: DistillStage = DistillStage()
    grpo: GrpoStage = GrpoStage()
    sample: SampleStage = SampleStage()
    rm: RmStage = RmStage()
    rsft: RsftStage = RsftStage()
    dpo: DpoStage = DpoStage()
    ppo: PpoStage = PpoStage()
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
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.device == "cpu":
            if self.common.torch_dtype != "float32":
                raise ValueError("common.torch_dtype must be float32 when device is cpu")
            if self.common.deepspeed is not None:
                raise ValueError("common.deepspeed needs GPUs: set it to null when device is cpu")
            for name in ("grpo", "lcrl", "realtime"):  # stages switched off may keep their GPU settings
                stage = getattr(self.stages, name)
                if stage.use_vllm and stage.enabled:
                    stage.vllm.check_cpu(f"stages.{name}")
            # engine: vllm (sampling, evaluation, distillation) and GRPO's colocated vLLM rollouts run on a CPU
            # too, with vLLM's CPU build (`make setup` installs it where there is no GPU) and a model whose
            # heads it supports (64, not 16).
        s = self.stages
        if s.rsft.enabled and not s.sample.enabled:
            raise ValueError(
                "stages.rsft trains on what stages.sample selects: enable sample or disable rsft"
            )
        for name, needs in (("rm", "sample"), ("dpo", "sample"), ("ppo", "rm")):
            if getattr(s, name).enabled and not getattr(s, needs).enabled:
                raise ValueError(f"stages.{name} needs stages.{needs}: enable it or disable {name}")
        if s.rsft.enabled and s.rsft.selection == "reward_model" and not s.rm.enabled:
            raise ValueError("stages.rsft.selection reward_model needs stages.rm enabled")
        if s.distill.enabled and s.distill.teacher is None:
            raise ValueError("stages.distill needs a teacher (path, and build_tiny for a tiny one)")
        uses_classifier = any(
            "fraud_classifier" in getattr(s, n).reward_funcs for n in ("grpo", "lcrl", "realtime")
        )
        if uses_classifier and not s.classifier.enabled:
            raise ValueError(
                "reward fraud_classifier needs stages.classifier enabled (it trains the classifier)"
            )
        return self

    def enabled(self) -> list[str]:
        return [name for name in STAGES if getattr(self.stages, name).enabled]

    def policy_stages(self) -> list[str]:
        """The enabled stages whose model the next stage starts from (side stages left out)."""
        return [name for name in self.enabled() if name not in SIDE_STAGES]


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
