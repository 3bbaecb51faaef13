"""The SAFE-QAQ stages as ms-swift invocations, driven by one recipe.

Every stage works in `<output_dir>/<stage>/`:

    train/                 ms-swift's output_dir (checkpoints, logging.jsonl, completions.jsonl)
    model/                 the model the next stage starts from (LoRA merged into its base; or the full checkpoint)
    stage-manifest.json    config, input hashes, library versions, metrics, checkpoint, wall time

A stage whose manifest exists for the same configuration is not run again. A stage interrupted mid-run (killed,
preempted) resumes from its last checkpoint when started again. With an `s3://` output_dir, stages work in a
local folder and upload it, with checksums, when they finish; the next stage downloads what it needs.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teleguard.train.config import STAGES, GrpoStage, Recipe, RsftStage, SftStage
from teleguard.train.distributed import node_rank, swift_launch_env
from teleguard.train.manifest import read_manifest, tree_sha256, write_manifest
from teleguard.train.swift import CPU_OPTIONS, SwiftError, flags, plugin_args, run_swift

TRAIN_DIR, MODEL_DIR = "train", "model"
# a checkpoint's trainer state: needed to resume a stage, not to start the next one or to serve
TRAINING_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "global_step*",
    "rng_*",
    "training_args.bin",
    "trainer_state.json",
)
WORK_DIR_ENV = "TELEGUARD_WORK_DIR"  # where stages with an s3:// output_dir keep their local copies


@dataclass(frozen=True)
class StageResult:
    stage: str
    folder: Path
    model: Path
    manifest: dict[str, Any]
    skipped: bool = False


def _is_uri(location: str) -> bool:
    return "://" in location


def latest_checkpoint(train_dir: Path) -> Path | None:
    """The newest complete checkpoint. A run killed while saving leaves a partial folder behind; the trainer
    writes trainer_state.json last, so only folders that have it count."""
    checkpoints = [
        p
        for p in train_dir.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


class Runner:
    """Runs the stages of one recipe, each from the model the previous enabled stage produced."""

    def __init__(self, recipe: Recipe, *, force: bool = False, log: Callable[[str], None] = print) -> None:
        self.recipe, self.force, self.log = recipe, force, log
        self._fetched: dict[str, Path] = {}
        out = recipe.output_dir
        if _is_uri(out):
            base = Path(os.environ.get(WORK_DIR_ENV, Path.home() / ".cache" / "teleguard" / "runs"))
            self.root = base / recipe.name
        else:
            self.root = Path(out)

    # ------------------------------------------------------------------------------------------ locations

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def _fetch(self, location: str) -> Path:
        """A local folder for a path or URI; a URI is downloaded and checked once per runner, not per use."""
        if not _is_uri(location):
            return Path(location)
        if location not in self._fetched:
            from teleguard.storage import local_copy

            self._fetched[location] = local_copy(location)
        return self._fetched[location]

    def datasets(self) -> Path:
        return self._fetch(self.recipe.data.datasets)

    def _stage_model(self, stage: str) -> Path:
        """The model a finished stage produced, downloading it when it was run elsewhere."""
        folder = self.folder(stage)
        if read_manifest(folder) is None and _is_uri(self.recipe.output_dir):
            from teleguard.storage import get_dir

            get_dir(f"{self.recipe.output_dir.rstrip('/')}/{stage}", folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(
                f"stage {stage!r} has not finished (no manifest in {folder}): run it first"
            )
        return folder / manifest["model"]

    def start_model(self, stage: str) -> Path:
        """The previous enabled stage's model, or the recipe's model for the first stage."""
        earlier = [s for s in STAGES[: STAGES.index(stage)] if s in self.recipe.enabled()]
        if earlier:
            return self._stage_model(earlier[-1])
        path = self._fetch(self.recipe.model.path)
        if not path.exists():
            spec = self.recipe.model.build_tiny
            if spec is None:
                raise FileNotFoundError(
                    f"model {self.recipe.model.path} does not exist (and no build_tiny is set)"
                )
            from teleguard.tiny_models import build_tiny_model, corpus_from_paths

            self.log(f"building a tiny {spec.arch} model at {path}")
            # relative patterns name files of the built datasets, so a pipeline step finds them in its artifact
            patterns = [p if Path(p).is_absolute() else str(self.datasets() / p) for p in spec.corpus]
            files = [Path(f) for pattern in patterns for f in sorted(glob.glob(pattern))]
            corpus = itertools.islice(corpus_from_paths(files), spec.corpus_limit)
            build_tiny_model(
                path,
                spec.arch,
                corpus,
                vocab_size=spec.vocab_size,
                hidden_size=spec.hidden_size,
                num_layers=spec.num_layers,
                seed=spec.seed,
            )
        return path

    # ---------------------------------------------------------------------------------------------- running

    def _upstream(self, stage: str) -> str | None:
        earlier = [s for s in STAGES[: STAGES.index(stage)] if s in self.recipe.enabled()]
        manifest = read_manifest(self.folder(earlier[-1])) if earlier else None
        return manifest.get("config_hash") if manifest else None

    def _config_hash(self, stage: str) -> str:
        """Changes with the stage's settings and with every stage before it (through the upstream hash)."""
        body = {"stage": stage, "stage_config": getattr(self.recipe.stages, stage).model_dump(mode="json")}
        body["upstream"] = self._upstream(stage)
        body.update(
            model=self.recipe.model.model_dump(mode="json"), common=self.recipe.common.model_dump(mode="json")
        )
        body.update(data=self.recipe.data.model_dump(mode="json"), device=self.recipe.device)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def run(self, stage: str, start_model: Path | str | None = None) -> StageResult:
        """Run one stage. `start_model` (a folder or URI) overrides the chain: a pipeline step passes the previous
        step's artifact.

        On the nodes other than the first of a multi-node stage, ms-swift trains but rank 0 writes the
        checkpoints, so those nodes return once training ends, without a model or manifest."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage not in self.recipe.enabled():
            raise ValueError(f"stage {stage!r} is disabled in recipe {self.recipe.name!r}")
        folder = self.folder(stage)
        config_hash = self._config_hash(stage)
        done = read_manifest(folder)
        if done and done.get("config_hash") == config_hash and not self.force:
            self.log(f"{stage}: already done ({folder / done['model']})")
            return StageResult(stage, folder, folder / done["model"], done, skipped=True)
        if self.force and done:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        start_model = self._fetch(str(start_model)) if start_model else self.start_model(stage)
        started = time.monotonic()
        self.log(f"{stage}: starting from {start_model}")
        fields = getattr(
            self, f"_run_{'sft' if stage == 'rsft' else 'grpo' if stage in ('lcrl', 'realtime') else stage}"
        )(stage, start_model, folder)
        if fields.get("worker_node"):
            self.log(f"{stage}: training finished on node {fields['worker_node']}; node 0 keeps the model")
            return StageResult(stage, folder, start_model, fields, skipped=True)
        manifest = {
            "stage": stage,
            "recipe": self.recipe.name,
            "config_hash": config_hash,
            "config": getattr(self.recipe.stages, stage).model_dump(mode="json"),
            "common": self.recipe.common.model_dump(mode="json"),
            "start_model": str(start_model),
            "wall_seconds": round(time.monotonic() - started, 1),
            **fields,
        }
        write_manifest(folder, **manifest)
        if _is_uri(self.recipe.output_dir):
            from teleguard.storage import put_dir

            put_dir(folder, f"{self.recipe.output_dir.rstrip('/')}/{stage}")
        self.log(f"{stage}: done in {manifest['wall_seconds']} s -> {folder / manifest['model']}")
        return StageResult(stage, folder, folder / manifest["model"], read_manifest(folder) or manifest)

    def run_all(self, stages: list[str] | None = None) -> list[StageResult]:
        return [self.run(stage) for stage in (stages or self.recipe.enabled())]

    # ------------------------------------------------------------------------------------ ms-swift options

    def _gpus(self) -> int | None:
        """GPUs on this node, so one node's GPUs all train (ms-swift launches one process per GPU)."""
        if self.recipe.device != "gpu":
            return None
        import torch

        return torch.cuda.device_count() or None

    def _model_args(self, model: Path) -> list[str]:
        m = self.recipe.model
        return ["--model", str(model), "--model_type", m.model_type, "--template", m.template]

    def _common_options(self) -> dict[str, Any]:
        c = self.recipe.common
        options: dict[str, Any] = {
            "tuner_type": c.tuner_type,
            "torch_dtype": c.torch_dtype,
            "max_length": c.max_length,
            "dataloader_num_workers": c.dataloader_num_workers,
            "seed": c.seed,
            "save_steps": c.save_steps,
            "save_total_limit": c.save_total_limit,
            "logging_steps": c.logging_steps,
            "report_to": c.report_to,
            "gradient_checkpointing": c.gradient_checkpointing,
            "deepspeed": c.deepspeed,
            "enable_thinking": c.enable_thinking,
            "split_dataset_ratio": 0,
            "add_version": False,  # a fixed output folder, so an interrupted run finds its checkpoints
            "check_model": False,
        }
        if c.tuner_type == "lora":
            options.update(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, target_modules=c.target_modules)
        if self.recipe.device == "cpu":
            options.update(CPU_OPTIONS, dataloader_num_workers=0, gradient_checkpointing=False)
        else:
            options.update(bf16=c.torch_dtype == "bfloat16", fp16=c.torch_dtype == "float16")
        return {**options, **c.extra}

    def _schedule_options(self, s: SftStage | RsftStage | GrpoStage) -> dict[str, Any]:
        return {
            "learning_rate": s.learning_rate,
            "num_train_epochs": s.num_train_epochs,
            "max_steps": s.max_steps,
            "per_device_train_batch_size": s.per_device_train_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "warmup_ratio": s.warmup_ratio,
            **s.extra,
        }

    def _dataset(self, source: Path, folder: Path, limit: int | None) -> Path:
        """The dataset file a stage trains on (the first `limit` rows copied into the stage folder)."""
        if not source.is_file():
            raise FileNotFoundError(f"dataset {source} does not exist (build it with `teleguard data build`)")
        if limit is None:
            return source
        target = folder / f"{source.stem}.first{limit}.jsonl"
        with source.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as dst:
            dst.writelines(itertools.islice(src, limit))
        return target

    def _train(
        self, command: str, stage: str, model: Path, folder: Path, options: dict[str, Any]
    ) -> dict[str, Any]:
        train_dir = folder / TRAIN_DIR
        resume = None
        if training_finished(train_dir):
            self.log(f"{stage}: training had finished; finishing the stage")
        else:
            resume = self._run_training(command, stage, model, folder, options)
        if (rank := node_rank(os.environ)) > 0:
            return {"worker_node": rank}
        checkpoint = latest_checkpoint(train_dir)
        if checkpoint is None:
            raise RuntimeError(f"{stage}: ms-swift finished without a checkpoint in {train_dir}")
        model_dir = self._final_model(checkpoint, folder)
        return {
            "inputs": {
                "model": str(model),
                "dataset": str(options["dataset"]),
                "dataset_sha256": tree_sha256(Path(options["dataset"])),
            },
            "checkpoint": str(checkpoint.relative_to(folder)),
            "resumed_from": str(resume.relative_to(folder)) if resume else None,
            "model": str(model_dir.relative_to(folder)),
            "metrics": train_metrics(train_dir),
        }

    def _run_training(
        self, command: str, stage: str, model: Path, folder: Path, options: dict[str, Any]
    ) -> Path | None:
        """Train, resuming from the newest complete checkpoint; returns the checkpoint it resumed from."""
        train_dir = folder / TRAIN_DIR
        options["output_dir"] = train_dir
        env = swift_launch_env(os.environ, gpus_per_node=self._gpus())
        if self.recipe.data.modality == "audio":
            env["ROOT_IMAGE_DIR"] = str(
                self.datasets()
            )  # audio clip paths are relative to the dataset folder
        plugins = plugin_args(audio=self.recipe.model.model_type == "qwen2_audio")
        while True:
            resume = latest_checkpoint(train_dir)
            if resume is not None:
                self.log(f"{stage}: resuming from {resume}")
                options["resume_from_checkpoint"] = resume
            args = [*self._model_args(model), *plugins, *flags(options)]
            try:
                run_swift(command, args, log_path=folder / f"{command}.log", environ=env)
                return resume
            except SwiftError as err:
                if resume is None or "valid checkpoint" not in str(err):
                    raise
                # a checkpoint cut short by a kill: set it aside and resume from the one before it
                self.log(f"{stage}: {resume.name} cannot be loaded; trying the checkpoint before it")
                resume.rename(resume.with_name(f"{resume.name}.incomplete"))
                options.pop("resume_from_checkpoint", None)

    def _final_model(self, checkpoint: Path, folder: Path) -> Path:
        """A full model folder for the next stage: LoRA merged into its base, or the full checkpoint itself."""
        target = folder / MODEL_DIR
        if target.exists():
            shutil.rmtree(target)
        if self.recipe.common.tuner_type == "full":
            shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns(*TRAINING_STATE))
            return target
        run_swift(
            "export",
            [
                "--adapters",
                str(checkpoint),
                "--merge_lora",
                "true",
                "--output_dir",
                str(target),
                *self._export_flags(),
            ],
            log_path=folder / "merge.log",
        )
        return target

    def _export_flags(self) -> list[str]:
        cpu = self.recipe.device == "cpu"
        return flags({"torch_dtype": "float32" if cpu else self.recipe.common.torch_dtype})

    # ---------------------------------------------------------------------------------------------- stages

    def _run_sft(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        s: SftStage | RsftStage = getattr(self.recipe.stages, stage)
        if stage == "rsft":
            source = self.folder("sample") / "sft.jsonl"
            if not source.is_file():
                self._stage_model("sample")  # downloads the sample stage's folder when it ran elsewhere
            if source.stat().st_size == 0:
                # Nothing was solved: training on nothing would fail deep inside ms-swift; say so and pass on.
                self.log(
                    "rsft: rejection sampling kept no responses; nothing to train, the model passes through"
                )
                return {"inputs": {"model": str(model), "dataset": str(source)}, "model": os.path.relpath(model, folder),
                        "metrics": {"rows": 0}, "note": "no correct samples to train on"}  # fmt: skip
        else:
            source = self.datasets() / self.recipe.data.train_split / "sft.jsonl"
        options = {**self._common_options(), **self._schedule_options(s)}
        options["dataset"] = self._dataset(source, folder, s.limit)
        return self._train("sft", stage, model, folder, options)

    def _run_grpo(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        s: GrpoStage = getattr(self.recipe.stages, stage)
        source = self.datasets() / self.recipe.data.train_split / f"{s.dataset}.jsonl"
        options = {**self._common_options(), **self._schedule_options(s)}
        options.update(
            rlhf_type="grpo",
            dataset=self._dataset(source, folder, s.limit),
            reward_funcs=s.reward_funcs,
            reward_weights=s.reward_weights,
            num_generations=s.num_generations,
            temperature=s.temperature,
            max_completion_length=s.max_completion_length,
            beta=s.beta,
            use_vllm=s.use_vllm,
            log_completions=True,
        )
        if s.use_vllm:
            options.update(
                vllm_mode=s.vllm.mode,
                vllm_gpu_memory_utilization=s.vllm.gpu_memory_utilization,
                vllm_max_model_len=s.vllm.max_model_len,
                vllm_tensor_parallel_size=s.vllm.tensor_parallel_size,
            )
        options.update(s.extra)
        return self._train("rlhf", stage, model, folder, options)

    def _run_sample(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        from teleguard.engines import recipe_engine
        from teleguard.train.sampling import read_rows, rejection_sample, sampling_params

        s = self.recipe.stages.sample
        source = self.datasets() / self.recipe.data.train_split / "grpo.jsonl"
        rows = read_rows(source, s.limit)
        engine = recipe_engine(self.recipe, model, self.datasets(), kind=s.engine, batch_size=s.batch_size)
        params = sampling_params(s)
        report = rejection_sample(engine, rows, params, folder, batch_size=s.batch_size)
        self.log(
            f"sample: kept {report['kept']} of {report['prompts']} prompts ({report['unsolved']} unsolved)"
        )
        # sampling trains nothing: the next stage starts from the same model
        return {
            "inputs": {"model": str(model), "dataset": str(source), "dataset_sha256": tree_sha256(source)},
            "model": os.path.relpath(model, folder),
            "metrics": report,
        }

    def _run_export(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        """The serving model: a full folder (LoRA already merged by the stage that trained it)."""
        target = folder / MODEL_DIR
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model, target, ignore=shutil.ignore_patterns(*TRAINING_STATE))
        serving = {"model_type": self.recipe.model.model_type, "template": self.recipe.model.template}
        (target / "teleguard-serving.json").write_text(json.dumps(serving, indent=2) + "\n", "utf-8")
        return {
            "inputs": {"model": str(model)},
            "model": MODEL_DIR,
            "metrics": {"files": len(list(target.iterdir()))},
        }


def training_finished(train_dir: Path) -> bool:
    """ms-swift logs a summary with train_runtime only when training ran to its end."""
    log = train_dir / "logging.jsonl"
    return log.is_file() and any('"train_runtime"' in line for line in log.read_text("utf-8").splitlines())


def train_metrics(train_dir: Path) -> dict[str, Any]:
    """The last training summary ms-swift logged (loss, rewards, runtime, steps)."""
    log = train_dir / "logging.jsonl"
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text("utf-8").splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    summary = next((r for r in reversed(rows) if "train_runtime" in r), {})
    metrics: dict[str, Any] = {"logged_steps": len(steps), **summary}
    if steps:
        last = steps[-1]
        metrics.update(
            {k: v for k, v in last.items() if k.startswith(("reward", "rewards/", "loss", "completions/"))}
        )
        metrics["global_step"] = last.get("global_step/max_steps")
    return metrics
