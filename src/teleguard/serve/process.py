"""`teleguard serve` as a subprocess, the way a user starts it: the serving demo and the benchmarks run it so.

`ServerProcess` writes the server's configuration to a file (`teleguard serve --config FILE`), keeps its
output in a log, waits for readiness (/v2/health/ready), gives up early when the server logs that loading the
model failed, and stops it with SIGTERM (the server drains), then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 120.0
LOAD_FAILED = "failed; the server stays unready"  # what teleguard.serve.server logs when loading fails


class ServerProcess:
    """`teleguard serve --config FILE` as a subprocess; output goes to `log`."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "serve.json"  # JSON is YAML: teleguard serve --config reads it
        self.config_file.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        self.log = workdir / "server.log"
        self.url = f"http://127.0.0.1:{config['port']}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "teleguard.cli", "serve", "--config", str(self.config_file)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-lines:])

    def load_failure(self) -> str | None:
        """The server's own error lines when loading the model failed, else None."""
        if not self.log.is_file():
            return None
        lines = self.log.read_text("utf-8", "replace").splitlines()
        at = next((i for i, line in enumerate(lines) if LOAD_FAILED in line), None)
        if at is None:
            return None
        cause = next((line for line in lines[at + 1 :] if "Error" in line.split(":")[0]), "")
        return "\n".join(line for line in (lines[at], cause) if line)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until /v2/health/ready answered 200; RuntimeError if the server died or took too long."""
        assert self.process is not None
        started = time.monotonic()
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"teleguard serve exited with code {self.process.returncode}:\n{self.log_tail()}"
                    )
                failed = self.load_failure()
                if failed:  # the server stays up but unready (as a pod would): no point in waiting
                    raise RuntimeError(f"teleguard serve could not load the model:\n{failed}")
                try:
                    if http.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > timeout:
                    raise RuntimeError(
                        f"teleguard serve was not ready after {timeout:g} s:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL after `timeout`; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@contextmanager
def serving(config: dict[str, Any], workdir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(config, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
