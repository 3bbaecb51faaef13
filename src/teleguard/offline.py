"""The offline environment and command line of the ms-swift subprocesses teleguard starts (training stages, a
local judge).

Here rather than in teleguard.train so that the rewards' local judge server can use it without depending on
the training code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

# Nothing may be fetched from a model or data hub at run time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1"}


def swift_env(
    extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`environ` (default: this process's environment) made offline, plus `extra`."""
    return {**(os.environ if environ is None else environ), **OFFLINE_ENV, **(extra or {})}


def swift_argv(command: str, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The command line of `swift <command> <args>` for a subprocess whose environment is `env`.

    ms-swift's launcher (`python -m swift.cli.main`) starts torchrun when NPROC_PER_NODE or NNODES is set, and
    otherwise runs the command's own script in a second interpreter. Without them, teleguard runs that script
    itself, as the launcher would: one interpreter and its imports fewer (about 3 s a command on 2 cores)."""
    if "NPROC_PER_NODE" in env or "NNODES" in env:
        return [sys.executable, "-m", "swift.cli.main", command, *args]
    spec = importlib.util.find_spec(f"swift.cli.{command.replace('-', '_')}")
    if spec is None or spec.origin is None:
        raise ValueError(f"ms-swift has no command {command!r}")
    return [sys.executable, spec.origin, *args]
