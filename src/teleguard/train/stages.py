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

import contextlib
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teleguard.train.config import (
    STAGES,
    DistillStage,
    GrpoStage,
    Recipe,
    RsftStage,
    SftStage,
    TinyModelSpec,
)
from teleguard.train.distributed import node_rank, swift_launch_env
from teleguard.train.manifest import read_manifest, tree_sha256, write_manifest
from teleguard.train.swift import CPU_OPTIONS, SwiftError, flags, plugin_args, run_swift

TRAIN_DIR, MODEL_DIR = "train", "model"
# GRPO's colocated vLLM rollouts on vLLM's CPU build: eager (compiling the graph costs a tiny model more start-up
# than it saves); teleguard.plugins.swift_vllm_cpu (added by plugin_args) syncs the trained weights into it
VLLM_CPU_ROLLOUT_OPTIONS: dict[str, Any] = {"vllm_enforce_eager": True}
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
# stages run by another stage's method: (stage, model, folder) -> the manifest's fields
STAGE_METHODS = {"rsft": "sft", "distill": "sft", "lcrl": "grpo", "realtime": "grpo"}
StageRun = Callable[[str, Path, Path], dict[str, Any]]


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

    def __init__(
        self,
        recipe: Recipe,
        *,
        force: bool = False,
        log: Callable[[str], None] = print,
        side_models: dict[str, Path] | None = None,
    ) -> None:
        """`side_models` ({"rm": folder, "classifier": folder}) stand in for side stages run elsewhere (a pipeline
        step hands in the artifact of the step that trained them)."""
        self.recipe, self.force, self.log = recipe, force, log
        self.side_models = dict(side_models or {})
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

    def side_model(self, stage: str) -> Path:
        """The model a side stage (classifier, rm) trained: handed in, or this runner's own stage output."""
        return self.side_models[stage] if stage in self.side_models else self._stage_model(stage)

    def _earlier(self, stage: str) -> list[str]:
        return [s for s in STAGES[: STAGES.index(stage)] if s in self.recipe.policy_stages()]

    def start_model(self, stage: str) -> Path:
        """The previous enabled policy stage's model, or the recipe's model for the first stage."""
        earlier = self._earlier(stage)
        if earlier:
            return self._stage_model(earlier[-1])
        path = self._fetch(self.recipe.model.path)
        if not path.exists():
            spec = self.recipe.model.build_tiny
            if spec is None:
                raise FileNotFoundError(
                    f"model {self.recipe.model.path} does not exist (and no build_tiny is set)"
                )
            self._build_tiny(path, spec)
        return path

    def _build_tiny(self, path: Path, spec: TinyModelSpec) -> None:
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
            head_dim=spec.head_dim,
            num_layers=spec.num_layers,
            seed=spec.seed,
        )

    # ---------------------------------------------------------------------------------------------- running

    def _upstream(self, stage: str) -> str | None:
        earlier = self._earlier(stage)
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
        if stage == "export":  # the serving profile it writes (its max tokens default to evaluate's)
            body.update(
                serving=self.recipe.serving.model_dump(mode="json"),
                eval_tokens=self.recipe.evaluate.max_tokens,
            )
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
        fields = self._stage_runner(stage)(stage, start_model, folder)
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

    def _stage_runner(self, stage: str) -> StageRun:
        """The method that runs `stage`: stages of one kind share one (RSFT and distillation are SFT runs)."""
        runners: dict[str, StageRun] = {
            "sft": self._run_sft,
            "classifier": self._run_classifier,
            "grpo": self._run_grpo,
            "sample": self._run_sample,
            "rm": self._run_rm,
            "dpo": self._run_dpo,
            "ppo": self._run_ppo,
            "export": self._run_export,
        }
        method = STAGE_METHODS.get(stage, stage)
        if method not in runners:
            raise ValueError(
                f"no runner for stage {stage!r} (method {method!r}); runners: {', '.join(runners)}"
            )
        return runners[method]

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
        self,
        command: str,
        stage: str,
        model: Path,
        folder: Path,
        options: dict[str, Any],
        environ: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Train (or finish a trained stage) and return the manifest fields. `environ` adds variables for the
        ms-swift process (reward functions read their settings from there)."""
        train_dir = folder / TRAIN_DIR
        resume = None
        if training_finished(train_dir):
            self.log(f"{stage}: training had finished; finishing the stage")
        else:
            resume = self._run_training(command, stage, model, folder, options, environ or {})
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
        self,
        command: str,
        stage: str,
        model: Path,
        folder: Path,
        options: dict[str, Any],
        environ: dict[str, str],
    ) -> Path | None:
        """Train, resuming from the newest complete checkpoint; returns the checkpoint it resumed from."""
        train_dir = folder / TRAIN_DIR
        options["output_dir"] = train_dir
        env = {**swift_launch_env(os.environ, gpus_per_node=self._gpus()), **environ}
        if self.recipe.data.modality == "audio":
            env["ROOT_IMAGE_DIR"] = str(
                self.datasets()
            )  # audio clip paths are relative to the dataset folder
        plugins = plugin_args(
            audio=self.recipe.model.model_type == "qwen2_audio",
            vllm_cpu=self.recipe.device == "cpu" and bool(options.get("use_vllm")),
        )
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
        s: SftStage | RsftStage | DistillStage = getattr(self.recipe.stages, stage)
        extra: dict[str, Any] = {}
        if stage == "rsft":
            source, extra = self._rsft_source(folder)
        elif stage == "distill":
            source, extra = self._distill_source(folder)
        else:
            source = self.datasets() / self.recipe.data.train_split / "sft.jsonl"
        if source.stat().st_size == 0:
            # Nothing to train on would fail deep inside ms-swift: say so and pass the model on.
            self.log(f"{stage}: no rows to train on; the model passes through")
            return {"inputs": {"model": str(model), "dataset": str(source)}, "model": os.path.relpath(model, folder),
                    "metrics": {"rows": 0, **extra}, "note": "no rows to train on"}  # fmt: skip
        options = {**self._common_options(), **self._schedule_options(s)}
        options["dataset"] = self._dataset(source, folder, s.limit)
        return with_metrics(self._train("sft", stage, model, folder, options), **extra)

    def _rsft_source(self, folder: Path) -> tuple[Path, dict[str, Any]]:
        """Stage 2a's rule selection, or the reward model's pick among the same samples."""
        rule = self.recipe.stages.rsft.selection == "rule"
        source = self.folder("sample") / ("sft.jsonl" if rule else "samples.jsonl")
        if not source.is_file():
            self._stage_model("sample")  # downloads the sample stage's folder when it ran elsewhere
        if rule:
            return source, {}
        from teleguard.train.preferences import RewardModel, rank_by_reward_model
        from teleguard.train.sampling import read_rows, write_jsonl

        reward_model = RewardModel(self.side_model("rm"), max_length=self.recipe.common.max_length)
        kept, report = rank_by_reward_model(read_rows(source), reward_model)
        target = folder / "rm-selection.jsonl"
        write_jsonl(target, kept)
        self.log(f"rsft: the reward model picked {report['kept']} responses ({report})")
        return target, {"rm_selection": report}

    def _distill_source(self, folder: Path) -> tuple[Path, dict[str, Any]]:
        """Teacher rationales for the training prompts, as student SFT rows."""
        from teleguard.engines import SamplingParams, SwiftEngine
        from teleguard.train.distill import distill_rows
        from teleguard.train.sampling import read_rows, write_jsonl

        d = self.recipe.stages.distill
        teacher = self.teacher_model()
        assert d.teacher is not None  # teacher_model() raised otherwise
        rows = read_rows(self.datasets() / self.recipe.data.train_split / "grpo.jsonl", d.rows)
        engine = SwiftEngine(
            teacher,
            kind=d.engine,
            model_type=d.teacher.model_type or self.recipe.model.model_type,
            template=d.teacher.template or self.recipe.model.template,
            media_root=self.datasets() if self.recipe.data.modality == "audio" else None,
            max_batch_size=d.batch_size,
        )
        params = SamplingParams(
            n=1, temperature=d.temperature, max_tokens=d.max_tokens, seed=self.recipe.common.seed
        )
        kept, report = distill_rows(
            engine, rows, params, batch_size=d.batch_size, max_chars=d.max_rationale_chars
        )
        target = folder / "rationales.jsonl"
        write_jsonl(target, kept)
        self.log(f"distill: {report['kept']} of {report['prompts']} rationales kept")
        return target, {"rationales": report, "teacher": str(teacher)}

    def teacher_model(self) -> Path:
        """The distill stage's teacher folder, built tiny on the spot when so configured."""
        teacher = self.recipe.stages.distill.teacher
        if teacher is None:
            raise ValueError("stages.distill has no teacher")
        path = self._fetch(teacher.path)
        if not path.exists():
            if teacher.build_tiny is None:
                raise FileNotFoundError(f"teacher {teacher.path} does not exist (and no build_tiny is set)")
            self._build_tiny(path, teacher.build_tiny)
        return path

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
        environ: dict[str, str] = {}
        if s.use_vllm:
            options.update(
                vllm_mode=s.vllm.mode,
                vllm_gpu_memory_utilization=s.vllm.gpu_memory_utilization,
                vllm_max_model_len=s.vllm.max_model_len,
                vllm_tensor_parallel_size=s.vllm.tensor_parallel_size,
                # rollout_correction/* in the log: how far vLLM's rollout log-probabilities are from the trained
                # policy's (about 0 when the weight sync works; an engine left on old weights shows here)
                log_rollout_offpolicy_metrics=True,
            )
            if self.recipe.device == "cpu":
                options.update(VLLM_CPU_ROLLOUT_OPTIONS)
                environ.update(vllm_cpu_environment(model))
        options.update(s.extra)
        if "fraud_classifier" in s.reward_funcs:
            from teleguard.rewards.classifier import CLASSIFIER_ENV

            environ[CLASSIFIER_ENV] = str(self.side_model("classifier"))
        if s.judge is None:
            return self._train("rlhf", stage, model, folder, options, environ)
        with self._judge(stage, s, model, folder) as judge_config:
            from teleguard.rewards.judge import read_stats

            environ.update(judge_config.to_env())
            fields = self._train("rlhf", stage, model, folder, options, environ)
        stats_dir = judge_config.resolved_stats_dir
        return with_metrics(fields, judge=read_stats(stats_dir)) if stats_dir else fields

    @contextlib.contextmanager
    def _judge(self, stage: str, s: GrpoStage, model: Path, folder: Path) -> Iterator[Any]:
        """The judge's settings for the stage: its endpoint, or a `swift deploy` on loopback while it trains.
        Judgements are cached in the stage folder unless the recipe names a cache."""
        assert s.judge is not None
        cache = str(folder / "judge-cache")
        serve = s.judge.serve
        if serve is None:
            yield s.judge.judge_config(cache=cache)
            return
        from teleguard.rewards.judge import local_judge_server

        judge_model = model if serve.model == "start" else self._fetch(serve.model)
        served = s.judge.endpoint.get("model", "judge")
        with local_judge_server(
            judge_model,
            serve.model_type or self.recipe.model.model_type,
            serve.template or self.recipe.model.template,
            served_model_name=served,
            log_path=folder / "judge-server.log",
        ) as base_url:
            self.log(f"{stage}: judge {judge_model} served at {base_url}")
            yield s.judge.judge_config(base_url, cache=cache)

    def _run_classifier(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        """A fraud classifier (`swift sft --task_type seq_cls`) for the fraud_classifier reward."""
        from teleguard.train.classifier import train_classifier_args, write_classifier_dataset

        s = self.recipe.stages.classifier
        dataset = folder / "classifier.jsonl"
        counts = write_classifier_dataset(self.datasets() / self.recipe.data.train_split, dataset, s.limit)
        common = {**self._common_options(), **self._schedule_options(s)}
        options = train_classifier_args(dataset, common, max_length=min(self.recipe.common.max_length, 1024))
        return with_metrics(self._train("sft", stage, model, folder, options), dataset=counts)

    def _preference_pairs(self, stage: str, folder: Path) -> tuple[Path, dict[str, Any]]:
        from teleguard.train.preferences import write_pairs

        samples = self.folder("sample") / "samples.jsonl"
        if not samples.is_file():
            self._stage_model("sample")
        target = folder / "pairs.jsonl"
        report = write_pairs(samples, target, length_ratio=getattr(self.recipe.stages, stage).length_ratio)
        self.log(f"{stage}: {report['pairs']} preference pairs from {report['prompts']} prompts")
        return target, report

    def _run_rm(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        """A reward model (`swift rlhf --rlhf_type rm`) on the preference pairs, initialised from the policy."""
        return self._run_preference(stage, model, folder, rlhf_type="rm")

    def _run_dpo(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        return self._run_preference(stage, model, folder, rlhf_type="dpo", beta=self.recipe.stages.dpo.beta)

    def _run_preference(self, stage: str, model: Path, folder: Path, **rlhf: Any) -> dict[str, Any]:
        pairs, report = self._preference_pairs(stage, folder)
        if report["pairs"] == 0:
            raise RuntimeError(
                f"{stage}: the sampled responses gave no preference pair ({report}); sample more responses per "
                "prompt or more prompts (stages.sample)"
            )
        s = getattr(self.recipe.stages, stage)
        options = {**self._common_options(), **self._schedule_options(s), **rlhf}
        options["dataset"] = self._dataset(pairs, folder, s.limit)
        return with_metrics(self._train("rlhf", stage, model, folder, options), pairs=report)

    def _run_ppo(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        """PPO against the reward model; the mean KL is checked against the target afterwards."""
        s = self.recipe.stages.ppo
        reward_model = self.side_model("rm")
        source = self.datasets() / self.recipe.data.train_split / f"{s.dataset}.jsonl"
        options = {**self._common_options(), **self._schedule_options(s)}
        options.update(
            rlhf_type="ppo",
            dataset=self._dataset(source, folder, s.limit),
            reward_model=reward_model,
            reward_model_type=self.recipe.model.model_type,
            reward_template=self.recipe.model.template,
            kl_coef=s.kl_coef,
            temperature=s.temperature,
            max_completion_length=s.max_completion_length,
        )
        options.update(s.extra)
        fields = self._train("rlhf", stage, model, folder, options)
        kl = mean_logged(folder / TRAIN_DIR, "objective/kl")
        within = None if kl is None or s.target_kl is None else kl <= s.target_kl
        return with_metrics(fields, mean_kl=kl, target_kl=s.target_kl, kl_within_target=within)

    def _run_sample(self, stage: str, model: Path, folder: Path) -> dict[str, Any]:
        from teleguard.train.sampling import sample_recipe, select_samples

        # every sample is kept too (samples.jsonl): preference pairs and reward-model ranking choose among them
        source, _ = sample_recipe(self.recipe, model, self.datasets(), folder)
        report = select_samples(folder, folder)
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
        self._write_profile(target)
        return {
            "inputs": {"model": str(model)},
            "model": MODEL_DIR,
            "metrics": {"files": len(list(target.iterdir()))},
        }

    def _write_profile(self, target: Path) -> None:
        """The serving profile (teleguard.serve.profile): serving asks the model as training did."""
        from teleguard.serve.profile import profile_for_build, write_profile

        serving = self.recipe.serving
        if serving.max_tokens is None:
            serving = serving.model_copy(update={"max_tokens": self.recipe.evaluate.max_tokens})
        profile, prompts = profile_for_build(
            serving,
            self.datasets(),
            modality=self.recipe.data.modality,
            source={"recipe": self.recipe.name},
            train_split=self.recipe.data.train_split,
        )
        write_profile(target, profile, prompts)


def training_finished(train_dir: Path) -> bool:
    """ms-swift logs a summary with train_runtime only when training ran to its end."""
    log = train_dir / "logging.jsonl"
    return log.is_file() and any('"train_runtime"' in line for line in log.read_text("utf-8").splitlines())


def vllm_cpu_environment(model: Path) -> dict[str, str]:
    """The variables a GRPO run with colocated vLLM on the CPU needs (the serving engine's CPU settings: no vLLM
    plugins, a small KV cache, no thread pinning), those set in this process's environment left to it. A model
    whose attention heads vLLM's CPU build does not run is refused here, before the trainer starts."""
    from teleguard.engines.vllm_engine import CPU_ENVIRONMENT, check_cpu_head_size

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "use_vllm on a CPU needs vLLM's CPU build (`make setup` installs it where no GPU is present), "
            "or set use_vllm to false for transformers rollouts"
        )
    check_cpu_head_size(model)
    return {name: value for name, value in CPU_ENVIRONMENT.items() if name not in os.environ}


def with_metrics(fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A stage's manifest fields with more figures in its metrics (a worker node's fields have none: as they are)."""
    if "metrics" in fields and extra:
        fields["metrics"] = {**fields["metrics"], **extra}
    return fields


def logged_rows(train_dir: Path) -> list[dict[str, Any]]:
    """What ms-swift logged while training (logging.jsonl), one dict per line; none when it never logged."""
    log = train_dir / "logging.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text("utf-8").splitlines() if line.strip()]


def mean_logged(train_dir: Path, key: str) -> float | None:
    """The mean of one logged training value over the steps that logged it."""
    values = [float(r[key]) for r in logged_rows(train_dir) if key in r]
    return sum(values) / len(values) if values else None


def train_metrics(train_dir: Path) -> dict[str, Any]:
    """The last training summary ms-swift logged (loss, rewards, runtime, steps)."""
    rows = logged_rows(train_dir)
    if not rows:
        return {}
    steps = [r for r in rows if "loss" in r]
    summary = next((r for r in reversed(rows) if "train_runtime" in r), {})
    metrics: dict[str, Any] = {"logged_steps": len(steps), **summary}
    if steps:
        last = steps[-1]
        metrics.update(
            {
                k: v
                for k, v in last.items()
                if k.startswith(("reward", "rewards/", "loss", "completions/", "rollout_correction/"))
            }
        )
        metrics["global_step"] = last.get("global_step/max_steps")
    return metrics
