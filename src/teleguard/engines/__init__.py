"""Inference engines for sampling, evaluation and serving, behind one contract.

- `contract`: what an engine is handed and answers (sampling's `Prompt`/`SamplingParams`/`Completion`, serving's
  `EngineRequest`/`Generation`/`Generate`), its errors and its configuration (`EngineConfig`, `CascadeConfig`,
  `EngineKind`);
- `swift`: ms-swift's transformers and vLLM engines (`SwiftEngine` for sampling and evaluation,
  `SwiftServingEngine` for the detector); `vllm_engine.build_vllm_engine`: the one construction of ms-swift's
  vLLM engine (GPU, or CPU with vLLM's CPU build) that both use;
- `remote`: an OpenAI-compatible endpoint; `cascade`: a small engine first, a large one for its unsure answers;
- `wrappers`: a deadline and micro-batching around any serving engine;
- `factory.build_engine`: the serving engine a configuration names, importing only the backend it chooses.

The engines depend on the contract (and `teleguard.contract`, `teleguard.storage`), never on `teleguard.serve`:
the detector plugs them in. Importing this package loads no backend (ms-swift, vLLM, httpx).
"""

from teleguard.engines.contract import (
    Completion,
    Engine,
    EngineKind,
    Prompt,
    SamplingParams,
    prompt_of_row,
)
from teleguard.engines.swift import SwiftEngine, recipe_engine

__all__ = [
    "Completion",
    "Engine",
    "EngineKind",
    "Prompt",
    "SamplingParams",
    "SwiftEngine",
    "prompt_of_row",
    "recipe_engine",
]
