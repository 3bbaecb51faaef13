"""The engines package as the server uses it: one factory that imports only the chosen backend, LoRA adapters
handed to ms-swift's vLLM engine, the model folder found by `teleguard.storage`, and a cascade counting where
its detector counts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from prometheus_client import CollectorRegistry

from teleguard.contract import Round
from teleguard.engines.cascade import CascadeEngine
from teleguard.engines.contract import EngineConfig, EngineRequest
from teleguard.engines.swift import SwiftEngine, SwiftServingEngine
from teleguard.serve.detector import Detector
from teleguard.serve.metrics import DetectorMetrics


class FakeVllmEngine:
    """Stands in for ms-swift's VllmEngine (vLLM needs a GPU): records how it was built and what it was asked."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.built.append({"model": model, **kwargs})
        self.asked: list[Any] = []
        self.threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_event_loop(self) -> asyncio.AbstractEventLoop:
        """The engine's own event loop on a daemon thread, as ms-swift's `InferEngine` keeps one."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True).start()
        return self._loop

    async def infer_async(self, request: Any, config: Any) -> Any:
        self.asked.append((request, config))
        self.threads.append(threading.current_thread())
        choice = SimpleNamespace(message=SimpleNamespace(content="ok"), logprobs=None)
        return SimpleNamespace(choices=[choice], usage=SimpleNamespace(completion_tokens=1))


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeVllmEngine]:
    from swift.infer_engine import InferRequest, RequestConfig

    FakeVllmEngine.built = []
    # a stand-in module: ms-swift's lazy one would import vLLM to look its engine up (and cache the fake)
    fake = SimpleNamespace(VllmEngine=FakeVllmEngine, InferRequest=InferRequest, RequestConfig=RequestConfig)
    monkeypatch.setitem(sys.modules, "swift.infer_engine", fake)
    return FakeVllmEngine


def test_the_vllm_engine_gets_the_lora_adapter(fake_vllm: type[FakeVllmEngine]) -> None:
    SwiftEngine("/m", kind="vllm", model_type="qwen3", adapters=["/lora"])
    SwiftEngine("/m", kind="vllm", model_type="qwen3")
    assert [b["adapters"] for b in fake_vllm.built] == [["/lora"], None]
    assert all("enable_lora" not in b for b in fake_vllm.built)  # ms-swift turns LoRA on for an adapter
    # sampling's and evaluation's engine is built as the serving one: vLLM's async engine, prefix caching
    assert all(b["use_async_engine"] and b["enable_prefix_caching"] for b in fake_vllm.built)
    with pytest.raises(ValueError, match="at most one adapter"):
        SwiftEngine("/m", kind="vllm", adapters=["/a", "/b"])


def test_the_vllm_serving_engine_asks_through_the_sampling_engine(fake_vllm: type[FakeVllmEngine]) -> None:
    config = EngineConfig(kind="vllm", model="/m", model_type="qwen3", adapters=("/lora",), max_tokens=4)
    engine = SwiftServingEngine(config)
    [built] = fake_vllm.built
    assert (built["adapters"], built["use_async_engine"], built["enable_prefix_caching"]) == (
        ["/lora"],
        True,
        True,
    )
    assert engine.batcher is None  # vLLM batches the requests of concurrent calls itself
    request = EngineRequest("c", Round.FRAUD, [{"role": "user", "content": "hi"}], max_tokens=16)
    [answer] = asyncio.run(engine.generate([request]))
    assert (answer.text, answer.tokens) == ("ok", 1)
    [(_, asked)] = engine.swift._engine.asked  # type: ignore[attr-defined]
    assert asked.max_tokens == 4 and asked.logprobs is True
    # asked on the engine's own loop thread, not the caller's (ms-swift's vLLM requests leave their thread in
    # inference mode)
    assert engine.swift._engine.threads[0] is not threading.current_thread()  # type: ignore[attr-defined]


def test_the_factory_imports_only_the_chosen_backend() -> None:
    code = """
import json, sys
from teleguard.engines.contract import CascadeConfig, EngineConfig
from teleguard.engines.factory import build_engine
remote = EngineConfig(kind="remote", url="http://127.0.0.1:9/v1", model="m")
build_engine(remote)
build_engine(remote.model_copy(update={"timeout_s": 2, "cascade": CascadeConfig(large=remote)}))
import teleguard.serve.server
print(json.dumps(sorted(m for m in ("swift", "vllm", "torch", "teleguard.tiny_models") if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_the_model_mount_is_kserves() -> None:
    from kserve.model_repository import MODEL_MOUNT_DIRS

    from teleguard import storage

    assert storage.MODEL_MOUNT_DIRS == MODEL_MOUNT_DIRS


def test_a_cascade_counts_where_its_detector_counts() -> None:
    async def say(requests: Any) -> list[str]:
        return ["no answer"] * len(requests)

    cascade = CascadeEngine(say, say, threshold=0.5)
    metrics = DetectorMetrics(CollectorRegistry())
    detector = Detector(cascade, metrics=metrics)
    assert cascade.metrics is detector.metrics is metrics
