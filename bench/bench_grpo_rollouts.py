"""GRPO step time with vLLM rollouts against transformers rollouts, on the CPU, side by side in one run.

    python bench/bench_grpo_rollouts.py [--steps 6] [--generations 4] [--completion-length 64] [--repeats 1]
                                        [--out results.json]

One tiny Qwen3 (hidden 128, heads 64 wide: the smallest vLLM's CPU build runs; tokenizer from the shared
transcripts) and one GRPO dataset (24 shared calls), both built on the spot. The same recipe's grpo stage runs
through teleguard's stage runner (`swift rlhf --rlhf_type grpo`, LoRA, float32) twice per repeat, once with
`use_vllm: false` (ms-swift's transformers rollouts) and once with `use_vllm: true` (a colocated vLLM engine,
vLLM's CPU build, the weight sync of `teleguard.plugins.swift_vllm_cpu` before each rollout); the order
alternates between repeats. Everything else is the same: steps, prompts, generations, completion length,
temperature, seed.

Per variant: ms-swift's own `step_time` for each step (rollout, weight sync, rewards, log-probabilities and the
update), the median over the steps after the first (the first pays one-off costs), the first step alone, the
training runtime, and the stage's wall time (which adds the trainer's start-up, for vLLM the engine's, and the
LoRA merge at the end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from teleguard.data.dataset import build_split
from teleguard.data.ingest import ingest
from teleguard.tiny_models import VLLM_TINY_SIZE, build_tiny_model, corpus_from_paths
from teleguard.train.config import load_recipe
from teleguard.train.stages import Runner, logged_rows

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "teleantifraud-dialogues"
CORPUS_LIMIT = 20_000  # enough transcript text for the tokenizer's Chinese merges (as the tests use)
OFF = {"enabled": False, "use_vllm": False}


def build_inputs(data: Path, folder: Path, size: dict[str, int] = VLLM_TINY_SIZE) -> tuple[Any, Path]:
    """The model (random weights, `size`) and a datasets folder with a train split of 24 calls (12 fraud,
    12 normal)."""
    files = sorted(data.glob("*_dialogues-*.jsonl"))
    if not files:
        raise SystemExit(f"no TeleAntiFraud dialogues under {data} (--data)")
    corpus = list(itertools.islice(corpus_from_paths(files), CORPUS_LIMIT))
    model = build_tiny_model(folder / "model", "qwen3", corpus, **size)
    calls, _ = ingest([files[0], files[-1]], "dialogues")
    fraud = [c for c in calls if c.labels.is_fraud][:12]
    normal = [c for c in calls if not c.labels.is_fraud][:12]
    build_split(fraud + normal, folder / "datasets" / "train")
    return model, folder / "datasets"


@dataclass(frozen=True)
class Settings:
    steps: int = 6
    generations: int = 4
    completion_length: int = 64
    device: str = "cpu"


def recipe_file(
    path: Path, model: Any, datasets: Path, output_dir: Path, args: Settings, use_vllm: bool
) -> Path:
    grpo = {
        "learning_rate": 1e-4,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.generations,  # one prompt per step
        "num_generations": args.generations,
        "max_completion_length": args.completion_length,
        "use_vllm": use_vllm,
        "limit": args.steps * 2,
    }
    body = {
        "name": "bench-grpo-rollouts",
        "device": args.device,
        "model": {"path": str(model.path), "model_type": model.model_type, "template": model.template},
        "data": {"datasets": str(datasets)},
        "output_dir": str(output_dir),
        "common": {"tuner_type": "lora", "torch_dtype": "float32" if args.device == "cpu" else "bfloat16",
                   "deepspeed": None, "max_length": 1024,
                   "save_steps": 1000, "logging_steps": 1, "dataloader_num_workers": 0,
                   "target_modules": ["all-linear"]},
        "stages": {"grpo": grpo, "sample": {"enabled": False, "engine": "transformers"},
                   "rsft": {"enabled": False}, "lcrl": OFF, "realtime": OFF, "export": {"enabled": False}},
        "evaluate": {"engine": "transformers"},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(body, allow_unicode=True), "utf-8")
    return path


def run_variant(folder: Path, model: Any, datasets: Path, args: Settings, use_vllm: bool) -> dict[str, Any]:
    name = "vllm" if use_vllm else "transformers"
    recipe = load_recipe(recipe_file(folder / f"{name}.yaml", model, datasets, folder / name, args, use_vllm))
    (result,) = Runner(recipe, log=lambda _: None).run_all()
    rows = logged_rows(result.folder / "train")
    steps = [float(r["step_time"]) for r in rows if "loss" in r and "step_time" in r]
    summary = next((r for r in reversed(rows) if "train_runtime" in r), {})
    later = steps[1:] or steps
    out = {
        "rollouts": name,
        "steps": len(steps),
        "step_s": [round(s, 3) for s in steps],
        "first_step_s": round(steps[0], 3),
        "median_step_s_after_first": round(statistics.median(later), 3),
        "train_runtime_s": float(summary.get("train_runtime", "nan")),
        "stage_wall_s": result.manifest["wall_seconds"],
        "mean_completion_tokens": result.manifest["metrics"].get("completions/mean_length"),
    }
    if use_vllm:
        out["rollout_log_ppl_abs_diff"] = result.manifest["metrics"].get(
            "rollout_correction/log_ppl_abs_diff"
        )
    print(json.dumps(out))
    return out


def compare_rollouts(
    folder: Path,
    settings: Settings,
    *,
    data: Path = DEFAULT_DATA,
    size: dict[str, int] = VLLM_TINY_SIZE,
    repeats: int = 1,
) -> dict[str, Any]:
    """The grpo stage with transformers and with vLLM rollouts, alternating over `repeats`; the figures."""
    model, datasets = build_inputs(data, folder, size)
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for use_vllm in order:
            run_folder = folder / f"repeat{repeat}"
            run_folder.mkdir(exist_ok=True)
            runs.append({"repeat": repeat, **run_variant(run_folder, model, datasets, settings, use_vllm)})
    medians = {
        name: statistics.median(r["median_step_s_after_first"] for r in runs if r["rollouts"] == name)
        for name in ("transformers", "vllm")
    }
    config = json.loads((model.path / "config.json").read_text("utf-8"))
    return {
        "model": (
            f"Qwen3 with random weights (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"heads {config['head_dim']} wide, vocab {config['vocab_size']}), LoRA (all linear), "
            f"{'float32' if settings.device == 'cpu' else 'bfloat16'}"
        ),
        "settings": {
            "device": settings.device,
            "steps": settings.steps,
            "prompts_per_step": 1,
            "generations": settings.generations,
            "max_completion_length": settings.completion_length,
            "repeats": repeats,
        },
        "runs": runs,
        "median_step_s": {k: round(v, 3) for k, v in medians.items()},
        "vllm_over_transformers": round(medians["vllm"] / medians["transformers"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one OpenMP thread per trainer, as the tests run them

    settings = Settings(args.steps, args.generations, args.completion_length)
    with tempfile.TemporaryDirectory() as tmp:
        compared = compare_rollouts(Path(tmp), settings, data=args.data, repeats=args.repeats)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        **compared,
    }
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
