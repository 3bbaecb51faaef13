"""Run ms-swift's command line (`swift sft`, `swift rlhf`, ...) as a subprocess, offline.

A subprocess rather than an in-process call: ms-swift configures torch, logging and distributed state
globally, and a stage must be able to run under torchrun exactly as it does on a cluster.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from teleguard.offline import swift_argv, swift_env
from teleguard.plugins import QWEN2_AUDIO_PLUGIN, REWARD_PLUGIN, VLLM_CPU_PLUGIN

# What a CPU-only machine needs (fp32, no worker processes, no hub checks, no external loggers).
CPU_OPTIONS: dict[str, object] = {
    "torch_dtype": "float32",
    "fp16": False,
    "bf16": False,
    "dataloader_num_workers": 0,
    "report_to": "none",
    "check_model": False,
}


def flags(options: Mapping[str, object]) -> list[str]:
    """ms-swift command-line flags from options: booleans as true/false, lists as several values, None left out."""
    argv: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        argv += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


class SwiftError(RuntimeError):
    """An ms-swift command that failed; carries the tail of its log."""


def plugin_args(audio: bool = False, vllm_cpu: bool = False) -> list[str]:
    """`--external_plugins` for teleguard's rewards, the Qwen2-Audio fixes for audio models, and the weight sync
    into colocated vLLM for GRPO with vLLM rollouts on vLLM's CPU build."""
    plugins = [REWARD_PLUGIN]
    if audio:
        plugins.append(QWEN2_AUDIO_PLUGIN)
    if vllm_cpu:
        plugins.append(VLLM_CPU_PLUGIN)
    return ["--external_plugins", *map(str, plugins)]


def run_swift(
    command: str,
    args: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run `swift <command> <args>`, writing its output to `log_path`; raise SwiftError if it fails.

    The command sees `environ` (default: this process's environment), offline, plus `env`.
    """
    full_env = swift_env(env, environ)
    argv = swift_argv(command, args, full_env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise SwiftError(f"swift {command} exited with {proc.returncode} (log: {log_path}):\n{tail}")


def latest_run_dir(output_dir: Path) -> Path:
    """ms-swift writes each run to a fresh `vN-<timestamp>` folder under --output_dir."""
    runs = sorted((p for p in output_dir.glob("v*-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no ms-swift run folder under {output_dir}")
    return runs[-1]
