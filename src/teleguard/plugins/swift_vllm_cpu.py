"""ms-swift 4 plugin: GRPO's colocated vLLM rollouts on vLLM's CPU build (the weight sync before each rollout).

Load with ``swift rlhf --rlhf_type grpo --use_vllm true --vllm_mode colocate --external_plugins <this file>``;
teleguard's GRPO stages add it when vLLM runs on the CPU. Elsewhere (a GPU, server mode) it changes nothing.

Why. Before each rollout the trainer copies its weights into the colocated vLLM model:
``RolloutTrainerMixin._load_state_dict_to_vllm`` calls the vLLM model's ``load_weights``, which hands every
tensor to its parameter's ``weight_loader``. On the CPU, vLLM's ``UnquantizedLinearMethod.
process_weights_after_loading`` (run once when vLLM loads the model) packs each linear layer's weight for its
CPU GEMM kernels (oneDNN or sgl-kernel) into a closure, ``layer.cpu_linear``, and then replaces
``layer.weight`` with an empty ``Parameter`` (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``).
The empty parameter has no ``weight_loader``: the first sync fails with "AttributeError: 'Parameter' object
has no attribute 'weight_loader'". Copying into it would not help either: the kernels read the packed copy.
The GPU path keeps its parameters as they were created, so ``load_weights`` works there.

Fix. vLLM has its own way to load new checkpoint-format weights into a processed model: layerwise reload
(``vllm.model_executor.model_loader.reload``, what vLLM's ``reload_weights`` and its weight-transfer engines
use, and ms-swift itself on Ascend NPUs). ``initialize_layerwise_reload`` puts every layer back in its
as-created form (on the meta device, original weight loaders), ``load_weights`` then buffers each layer's
tensors and, once a layer has all of them, materialises it, loads them and runs its post-load processing
again (new packed weights, new ``cpu_linear``); ``finalize_layerwise_reload`` finishes the layers left (the
attention layers, anything not in the state dict). This plugin wraps each ``_load_state_dict_to_vllm`` call
in those two steps when vLLM runs on the CPU platform in colocate mode. ms-swift's own
``process_weights_after_loading`` pass afterwards finds the linear weights already processed (empty again)
and leaves them alone; it repacks the LM head's weight, which is kept.

Each load is counted and logged (``teleguard: synced ... into vLLM on the CPU``): one per training step, or one
per parameter group with ms-swift's ``move_model_batches`` (each group its own reload; the layers a group leaves
out keep their weights). Runs and tests can see from it that vLLM got the trained weights before its rollouts;
``--log_rollout_offpolicy_metrics true`` logs how far its rollout log-probabilities are from the policy's.

Measured with vLLM 0.32.0 (CPU build), ms-swift 4.6.0 and torch 2.13.0+cpu on a tiny Qwen3, full fine-tuning
and LoRA (merged into the synced weights), also with ``move_model_batches 2``: the rollout log-probabilities
match the trained policy's (0.0 log-perplexity difference); with the weights left unsynced they differ by 0.1.

Importing the file twice (ms-swift imports it under a hashed module name) is harmless.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin

SYNC_LOG = "teleguard: synced {tensors} tensors into vLLM on the CPU (layerwise reload, sync {count})"
_MARKER = "_teleguard_cpu_layerwise_reload"

logger = logging.getLogger("teleguard.vllm_cpu")
syncs = 0  # weight syncs done in this process


def vllm_on_cpu() -> bool:
    """Whether vLLM's current platform is the CPU (its CPU build)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def load_with_layerwise_reload(model: Any, model_config: Any, load: Any) -> None:
    """Run `load()` (which calls `model.load_weights`) inside vLLM's layerwise reload of `model`."""
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    initialize_layerwise_reload(model)
    try:
        load()
    finally:
        finalize_layerwise_reload(model, model_config)


def _patch() -> None:
    original = RolloutTrainerMixin._load_state_dict_to_vllm
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def _load_state_dict_to_vllm(self: Any, state_dict: dict[str, Any]) -> None:
        if getattr(self, "vllm_mode", None) != "colocate" or not vllm_on_cpu():
            return original(self, state_dict)
        global syncs
        tensors = len(state_dict)
        load_with_layerwise_reload(
            self.engine.inner_model,
            self.engine.engine.model_config,
            lambda: original(self, state_dict),
        )
        syncs += 1
        message = SYNC_LOG.format(tensors=tensors, count=syncs)
        logger.info(message)
        print(message, flush=True)  # ms-swift's log handlers are its own; the run's log must show it

    setattr(_load_state_dict_to_vllm, _MARKER, True)
    RolloutTrainerMixin._load_state_dict_to_vllm = _load_state_dict_to_vllm  # type: ignore[method-assign]


_patch()
