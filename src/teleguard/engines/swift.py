"""ms-swift's inference engines (`TransformersEngine` and `VllmEngine`, on CPU or GPU) for sampling,
evaluation and serving, so generation applies the same chat template as training, audio included (the
Qwen2-Audio plugin is imported first for audio models). ms-swift (and vLLM) are imported only when an engine
of that kind is built.

`SwiftEngine` is the synchronous engine of sampling and evaluation: `generate` answers texts,
`generate_completions` also returns the generated tokens' log-probabilities, from which
`Completion.confidence` reads the model's probability of the label an answer gives, by the same definition the
detector uses (`teleguard.contract.confidence`). `infer` / `infer_async` hand out ms-swift's own responses.

`SwiftServingEngine` is a `SwiftEngine` as the detector's async `generate(requests)`:

- ``transformers``: inference blocks, so it runs on one worker thread; a `MicroBatcher` collects the requests
  of concurrent calls for up to `batch_wait_ms` (or `max_batch_size` requests) and runs them as one batched
  engine call: continuous batching as far as a transformers engine can.
- ``vllm`` (GPU, or CPU with vLLM's CPU build): vLLM's async engine; each request is handed to vLLM at once
  and vLLM batches them continuously across calls, with prefix caching on (every call's rounds share the
  system prompt and the call's transcript or audio). No micro-batcher in front: it would only delay requests.
  The engine is built by `teleguard.engines.vllm_engine.build_vllm_engine`, the construction sampling and
  evaluation use too.

Clips (`EngineRequest.audios`) are handed to ms-swift as in-memory WAV bytes (`teleguard.engines.audio`).
Every answer carries the generated tokens' log-probabilities when `EngineConfig.logprobs` is on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teleguard.contract.confidence import token_logprobs
from teleguard.engines.audio import wav_bytes
from teleguard.engines.contract import (
    Completion,
    EngineConfig,
    EngineDevice,
    EngineFailure,
    EngineKind,
    EngineRequest,
    Generation,
    Prompt,
    SamplingParams,
)
from teleguard.engines.wrappers import MicroBatcher

# --- sampling and evaluation ---------------------------------------------------------------------------------


class SwiftEngine:
    """An ms-swift inference engine over a model folder (and optionally LoRA adapters)."""

    def __init__(
        self,
        model: str | Path,
        *,
        kind: EngineKind = "transformers",  # transformers or vllm
        model_type: str | None = None,
        template: str | None = None,
        adapters: Sequence[str] = (),
        media_root: str | Path | None = None,
        max_batch_size: int = 16,
        device: EngineDevice = "auto",  # vllm: where it runs (auto: CUDA if present)
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if media_root is not None:
            # ms-swift resolves relative audio paths in rows against ROOT_IMAGE_DIR.
            os.environ["ROOT_IMAGE_DIR"] = str(media_root)
        if model_type == "qwen2_audio":
            import teleguard.plugins.swift_qwen2_audio  # noqa: F401  (registers the transformers-5 fixes)
        options = dict(engine_options or {})
        self.seeded = True  # sampling's seed reaches each request
        if kind == "transformers":
            from swift.infer_engine import TransformersEngine

            self._engine = TransformersEngine(
                str(model),
                model_type=model_type,
                template_type=template,
                adapters=list(adapters) or None,
                max_batch_size=max_batch_size,
                **options,
            )
        elif kind == "vllm":
            from teleguard.engines.vllm_engine import build_vllm_engine, on_cpu

            # vLLM 0.32's CPU build kills its engine on a seeded request whose prompt it prefills in parts: it
            # rewinds the request's generator ("CPU Generator does not use offset"). On a CPU, vLLM samples
            # without per-request seeds (its engine seed still applies).
            self.seeded = not on_cpu(device)
            self._engine = build_vllm_engine(
                str(model),
                model_type=model_type,
                template=template,
                adapters=adapters,
                device=device,
                options=options,
            )
        else:
            raise ValueError(f"unknown engine kind {kind!r}; choose transformers or vllm")
        self.kind = kind

    def close(self) -> None:
        """Release the engine's model now (vLLM: stop its engine process); the engine answers no more."""
        if self.kind == "vllm":
            from teleguard.engines.vllm_engine import shutdown_vllm_engine

            shutdown_vllm_engine(self._engine)

    def infer(self, requests: Sequence[Any], config: Any, *, use_tqdm: bool = False) -> list[Any]:
        """ms-swift's responses (choices with token usage and logprobs) to its `InferRequest`s under one
        `RequestConfig`, in order; blocking. For callers that need more than texts (the serving engine)."""
        return self._engine.infer(list(requests), config, use_tqdm=use_tqdm)

    async def infer_async(self, request: Any, config: Any) -> Any:
        """ms-swift's response to one `InferRequest`; vLLM's async engine batches concurrent ones.

        vLLM requests run on the engine's own event loop thread (the one its blocking `infer` uses), whatever
        loop awaits them: ms-swift's vLLM `infer_async` holds `torch.inference_mode()` across an await, so
        concurrent requests leave their driving thread in inference mode (each exit restores the state its
        entry saw, and the exits interleave). On the caller's loop that broke autograd for whatever ran next
        on that thread. vLLM's async engine also stays bound to the first loop that drives it.
        """
        if self.kind != "vllm":
            return await self._engine.infer_async(request, config)
        loop = self._engine._get_event_loop()
        future = asyncio.run_coroutine_threadsafe(self._engine.infer_async(request, config), loop)
        return await asyncio.wrap_future(future)

    def _sample(self, prompts: Sequence[Prompt], params: SamplingParams, *, logprobs: bool) -> list[Any]:
        from swift.infer_engine import InferRequest, RequestConfig

        requests = [InferRequest(messages=p.messages, audios=list(p.audios)) for p in prompts]
        config = RequestConfig(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_tokens,
            seed=params.seed if self.seeded else None,
            logprobs=logprobs,
        )
        return self.infer(requests, config, use_tqdm=len(requests) > 1)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        responses = self._sample(prompts, params, logprobs=False)
        return [[choice.message.content or "" for choice in r.choices] for r in responses]

    def generate_completions(
        self, prompts: Sequence[Prompt], params: SamplingParams
    ) -> list[list[Completion]]:
        """As `generate`, with each completion's token log-probabilities (for `Completion.confidence`).

        Costs more than `generate` on the transformers engine (it keeps every step's logits), so sampling
        that only needs texts calls `generate`.
        """
        responses = self._sample(prompts, params, logprobs=True)
        return [
            [Completion(c.message.content or "", token_logprobs(c.logprobs)) for c in r.choices]
            for r in responses
        ]


def recipe_engine(
    recipe: Any, model: str | Path, datasets: Path, *, kind: EngineKind, batch_size: int
) -> SwiftEngine:
    """The engine for a recipe's model family; audio rows resolve their clips against the dataset folder.

    kind vllm runs where the recipe says (a cpu recipe: vLLM's CPU build), built like the serving engine."""
    return SwiftEngine(
        model,
        kind=kind,
        model_type=recipe.model.model_type,
        template=recipe.model.template,
        media_root=datasets if recipe.data.modality == "audio" else None,
        max_batch_size=batch_size,
        device="cpu" if recipe.device == "cpu" else "auto",
    )


# --- serving ------------------------------------------------------------------------------------------------


def _swift_names(config: EngineConfig) -> tuple[str | None, str | None]:
    """model_type and template: from the config, else from a tiny model's marker file (tests, CPU recipes)."""
    if config.model_type or config.model is None:
        return config.model_type, config.template
    # A tiny model folder has no hub id and ms-swift cannot tell its Qwen model_type from its architecture
    # (several share it), while a trained checkpoint carries ms-swift's args.json. Only then, and only for a
    # local engine, is tiny_models (standard library only) imported.
    from teleguard.tiny_models import MARKER_FILE, load_tiny_model

    if (Path(config.model) / MARKER_FILE).is_file():
        tiny = load_tiny_model(Path(config.model))
        return tiny.model_type, config.template or tiny.template
    return None, config.template


def _infer_request(request: EngineRequest) -> Any:
    from swift.infer_engine import InferRequest

    return InferRequest(
        messages=[dict(m) for m in request.messages], audios=[wav_bytes(c) for c in request.audios]
    )


def _generation(response: Any) -> Generation:
    choice = response.choices[0]
    usage = getattr(response, "usage", None)
    return Generation(
        choice.message.content or "",
        getattr(usage, "completion_tokens", None),
        token_logprobs(getattr(choice, "logprobs", None)),
    )


class SwiftServingEngine:
    """A local ms-swift engine (transformers or vLLM) as the policy's `generate`."""

    def __init__(self, config: EngineConfig) -> None:
        if config.kind not in ("transformers", "vllm"):
            raise ValueError(f"SwiftServingEngine runs transformers or vllm, not {config.kind}")
        if not config.model:
            raise ValueError(f"the {config.kind} engine needs 'model' (a local model folder)")
        self.config = config
        self.kind = config.kind
        model_type, template = _swift_names(config)
        options = dict(config.engine_options)
        if config.kind == "transformers":
            import torch

            if config.device == "cpu":
                options.setdefault("device_map", "cpu")
                options.setdefault("torch_dtype", torch.float32)
            elif config.device == "cuda":
                options.setdefault("device_map", "cuda")
        self.swift = SwiftEngine(
            config.model,
            kind=config.kind,
            model_type=model_type,
            template=template,
            adapters=config.adapters,
            max_batch_size=config.max_batch_size,
            device=config.device,
            engine_options=options,
        )
        # vLLM batches continuously itself (build_vllm_engine's async engine); transformers needs the batcher
        self.batcher = (
            MicroBatcher(
                self._infer_batch, max_batch_size=config.max_batch_size, wait_ms=config.batch_wait_ms
            )
            if config.kind == "transformers"
            else None
        )

    def _request_config(self, max_tokens: int) -> Any:
        from swift.infer_engine import RequestConfig

        # logprobs: ms-swift returns each generated token's logprob (transformers: log-softmax of the raw
        # logits; vLLM: its sample logprobs) in the choice, the confidence's input
        return RequestConfig(
            max_tokens=max_tokens, temperature=self.config.temperature, logprobs=self.config.logprobs
        )

    def _infer_batch(self, requests: list[EngineRequest]) -> list[Generation]:
        """One blocking engine call per distinct max_tokens (in practice one)."""
        out: dict[int, Generation] = {}
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.config.max_tokens_for(r), []).append(i)
        for max_tokens, indices in groups.items():
            responses = self.swift.infer(
                [_infer_request(requests[i]) for i in indices],
                self._request_config(max_tokens),
            )
            for i, response in zip(indices, responses, strict=True):
                if isinstance(response, Exception):
                    raise EngineFailure(f"ms-swift failed on a request: {response}")
                out[i] = _generation(response)
        return [out[i] for i in range(len(requests))]

    async def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        if self.batcher is not None:
            return await self.batcher.generate(requests)

        async def one(request: EngineRequest) -> Generation:
            response = await self.swift.infer_async(
                _infer_request(request), self._request_config(self.config.max_tokens_for(request))
            )
            return _generation(response)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    __call__ = generate

    async def aclose(self) -> None:
        if self.batcher is not None:
            await self.batcher.aclose()
        self.swift.close()
