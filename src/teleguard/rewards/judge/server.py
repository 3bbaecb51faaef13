"""A local judge server: `swift deploy` on loopback, for CPU recipes and tests (an OpenAI-compatible URL)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from teleguard.loopback import free_port
from teleguard.offline import swift_argv, swift_env

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_judge_server(
    model_dir: str | os.PathLike[str],
    model_type: str,
    template: str,
    port: int | None = None,
    *,
    served_model_name: str = "judge",
    torch_dtype: str = "float32",
    startup_timeout_s: float = 300.0,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run `swift deploy` on 127.0.0.1 and yield its OpenAI-compatible base URL (`http://127.0.0.1:PORT/v1`).

    The command (ms-swift 4.6): `swift deploy --model DIR --model_type T --template TPL --infer_backend
    transformers --host 127.0.0.1 --port P --torch_dtype float32 --served_model_name judge --log_interval -1
    --verbose false`, offline. (4.6 names the backend `transformers`; `pt` is a deprecated alias. Deploy has no
    `--check_model`; it binds exactly the port given when it is free, else the next free one, so a free port
    is picked here first.) Requests name the model `served_model_name`. The server answers `logprobs` with
    `top_logprobs` (up to its `--max_logprobs`, 20) on CPU too; with a qwen3 template the answer content
    starts with the empty `<think>\\n\\n</think>\\n\\n` prefix, which the judge skips.

    Waits until GET /v1/models answers, then yields; on exit stops the server's process group (SIGTERM, then
    SIGKILL after 10 s). Measured start with the 2-layer tiny test model on a 2-core CPU machine: 8-13 s to
    the first /v1/models answer (mostly importing torch/transformers/ms-swift); a real 7B model adds its
    loading time. The server's output goes to `log_path` (default: a temp file, named in errors).
    """
    import httpx

    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="teleguard-judge-server-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    else:
        log_file = Path(log_path)
        log_file.parent.mkdir(parents=True, exist_ok=True)
    env = swift_env()
    options = {
        "model": str(model_dir), "model_type": model_type, "template": template, "infer_backend": "transformers",
        "host": "127.0.0.1", "port": str(port), "torch_dtype": torch_dtype, "served_model_name": served_model_name,
        "log_interval": "-1", "verbose": "false",
    }  # fmt: skip
    args = [token for name, value in options.items() for token in (f"--{name}", value)]
    argv = swift_argv("deploy", [*args, *extra_args], env)
    base_url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with log_file.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"swift deploy exited with {proc.returncode} before serving (log: {log_file}):\n"
                        + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
                    )
                with contextlib.suppress(httpx.HTTPError):
                    models = client.get(f"{base_url}/models")
                    if models.status_code == 200 and any(
                        m.get("id") == served_model_name for m in models.json().get("data", [])
                    ):
                        break
                if time.monotonic() - started > startup_timeout_s:
                    raise TimeoutError(
                        f"swift deploy did not serve {base_url} within {startup_timeout_s:g} s (log: {log_file})"
                    )
                time.sleep(0.2)
        log.info("judge server %s up in %.1f s (log: %s)", base_url, time.monotonic() - started, log_file)
        yield base_url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
