"""Detector replicas as a deployment runs them: `teleguard serve` subprocesses sharing one session store, their
engine a scripted OpenAI-compatible endpoint on loopback (the remote engine), so that every replica gets the
same answers for the same prompt.

`ScriptedApi` answers a chat completion by the round its last question asks (the JSON key it names) and by
content: fraud when the call's text holds `FRAUD_WORD`. It records every prompt and can hold the first
request whose prompt holds a marker until the test lets it go (to kill a replica mid-evaluation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from teleguard.contract import Round, format_answer
from teleguard.loopback import LOOPBACK, free_port
from tests.support.loopback_api import LoopbackApi
from tests.support.processes import wait_ready

FRAUD_WORD = "验证码"
SCENE = "咨询客服"
FRAUD_TYPE = "银行诈骗"


def call_turns(call_id: str, *, fraud: bool, n: int = 5) -> list[list[dict[str, Any]]]:
    """One finished turn per chunk; a fraud call asks for the code at its third turn. The call id is in the
    text, so that no two calls show the model the same prompt."""
    texts = [
        f"您好，我是银行客服，工号{call_id}。",
        "您好，请问有什么事？",
        f"请把短信{FRAUD_WORD}告诉我。" if fraud else "我们有一个新的理财活动。",
        "好的，我看一下。",
        "那我先挂了。",
        "再见。",
    ]
    return [
        [{"speaker": "left" if i % 2 == 0 else "right", "text": texts[i % len(texts)], "start": 2.0 * i,
          "end": 2.0 * i + 2}]
        for i in range(n)
    ]  # fmt: skip


class ScriptedApi(LoopbackApi):
    """POST /v1/chat/completions with scripted answers (see the module's text)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.prompts: list[tuple[str, str]] = []  # (round, the whole conversation as JSON)
        self.hold_marker: str | None = None
        self.holding = threading.Event()  # a held request arrived
        self.release = threading.Event()

    def hold(self, marker: str) -> None:
        self.hold_marker, self.holding, self.release = marker, threading.Event(), threading.Event()

    def route(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any]:
        if (method, path) != ("POST", "/v1/chat/completions"):
            raise KeyError(path)
        messages = json.loads(body)["messages"]
        text = json.dumps(messages, ensure_ascii=False)
        question = messages[-1]["content"]
        question = question if isinstance(question, str) else json.dumps(question, ensure_ascii=False)
        round_ = next(r for r in (Round.FRAUD_TYPE, Round.SCENE, Round.FRAUD) if f'"{r.value}"' in question)
        with self.lock:
            self.prompts.append((round_.value, text))
            held = self.hold_marker is not None and self.hold_marker in text
            if held:
                self.hold_marker = None
        if held:
            self.holding.set()
            self.release.wait(30)
        if round_ is Round.FRAUD:
            answer = format_answer(
                Round.FRAUD, FRAUD_WORD in text, stage="late_stage", reason="r", confidence=0.9
            )
        elif round_ is Round.SCENE:
            answer = format_answer(Round.SCENE, SCENE, stage="late_stage", confidence=0.8)
        else:
            answer = format_answer(Round.FRAUD_TYPE, FRAUD_TYPE, stage="late_stage", confidence=0.7)
        return 200, {
            "choices": [{"message": {"role": "assistant", "content": answer}}],
            "usage": {"completion_tokens": 5},
        }

    def repeated(self) -> list[tuple[str, str]]:
        """Prompts asked more than once (an evaluation run twice)."""
        with self.lock:
            return [p for p, n in Counter(self.prompts).items() if n > 1]


class Replica:
    """One `teleguard serve` process on a free port, its log in `workdir`."""

    def __init__(self, name: str, config: Path, store_url: str, workdir: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = workdir / f"serve-{name}.log"
        bin_dir = Path(sys.executable).parent
        command = [str(bin_dir / "teleguard"), "serve", "--config", str(config), "--port", str(self.port),
                   "--session-store", store_url, "--name", "teleguard"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/calls/stream"

    def wait_ready(self) -> Replica:
        wait_ready(self.url, self.process, self.log, timeout=120)
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every teleguard_* sample of its /metrics: (name, sorted labels) -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("teleguard_"):
                    out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> int:
        self.process.terminate()
        return self.process.wait(60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.terminate()


def write_config(path: Path, engine_url: str, *, key_prefix: str) -> Path:
    """A small serving configuration: the remote engine, every turn evaluated, short timeouts and leases."""
    config = {
        "engine": {
            "kind": "remote",
            "url": engine_url,
            "model": "scripted",
            "timeout_s": 10,
            "logprobs": False,
        },
        "policy": {"every_seconds": None, "min_turns": 1, "ask_scene": "until_known", "max_tokens": 64},
        "detector": {
            "engine_timeout_s": 10,
            "ttl_seconds": 120,
            "drain_seconds": 10,
            "store": {"timeout_s": 0.5, "lease_seconds": 1.0, "key_prefix": key_prefix},
        },
        "grace_seconds": 5,
    }
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def total(
    samples: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str, **labels: str
) -> float:
    """A metric summed over replicas (and over the labels not given)."""
    want = set(labels.items())
    return sum(v for s in samples for (n, ls), v in s.items() if n == name and want <= set(ls))


def wait_until(predicate: Any, timeout: float = 15.0, pause: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause)
    return bool(predicate())
