"""Waiting on the `teleguard serve` subprocesses that tests start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx


def wait_ready(url: str, process: Any, log: Path, timeout: float = 180.0) -> None:
    """Wait for a `teleguard serve` subprocess to answer /v2/health/ready with 200 (its log in the failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"teleguard serve exited:\n{log.read_text('utf-8')[-3000:]}"
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready after {timeout:g} s:\n{log.read_text('utf-8')[-3000:]}")
