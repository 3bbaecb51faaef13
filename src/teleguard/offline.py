"""The offline environment of the ms-swift subprocesses teleguard starts (training stages, a local judge).

Here rather than in teleguard.train so that the rewards' local judge server can use it without depending on
the training code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Nothing may be fetched from a model or data hub at run time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1"}


def swift_env(
    extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`environ` (default: this process's environment) made offline, plus `extra`."""
    return {**(os.environ if environ is None else environ), **OFFLINE_ENV, **(extra or {})}
