"""Inference engines for the real-time detector, behind the policy's async `generate(requests)` interface.

Three kinds, chosen by `EngineConfig.kind`:

- ``transformers``: ms-swift's TransformersEngine (CPU or GPU) through `teleguard.engines.SwiftEngine`, so
  generation applies the chat template training used. Inference blocks, so it runs on one worker thread; a
  `MicroBatcher` collects the requests of concurrent calls for up to `batch_wait_ms` (or `max_batch_size`
  requests) and runs them as one batched engine call: continuous batching as far as a transformers engine can.
- ``vllm`` (GPU): ms-swift's VllmEngine with vLLM's async engine; each request is handed to vLLM at once and vLLM
  batches them continuously across calls, with prefix caching on (every call's rounds share the system prompt
  and the call's transcript or audio). vLLM is imported only when this kind is built.
- ``remote``: an OpenAI-compatible chat-completions endpoint (vLLM's server, KServe's OpenAI route, ...) over
  httpx; clips go as ``input_audio`` parts carrying base64 WAV.

Clips (`EngineRequest.audios`, float32 arrays of shape (samples, 2) at 16 kHz) are handed to ms-swift as
in-memory PCM16 WAV bytes, the format training's clips were written in (`teleguard.data.audio.write_wav`);
ms-swift loads them like its dataset files (librosa, mono, 16 kHz). Nothing touches the disk.

Every kind asks for the generated tokens' log-probabilities (`EngineConfig.logprobs`) and returns them in
`Generation.logprobs`; the policy reads the answer's confidence from them (`teleguard.contract.confidence`).

Failures are `EngineFailure` (kind "error") and `EngineTimeout` (kind "timeout"), both `EngineError`s, so the
server can answer 503 and count them apart. `with_timeout` puts a deadline on any `generate`.

Any of the three can be the small engine of a confidence cascade (`EngineConfig.cascade`, see
`teleguard.serve.cascade`): its unsure answers are asked again of a second, larger engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from teleguard.contract.confidence import token_logprobs
from teleguard.serve.policy import EngineError, EngineRequest, Generate, Generation
from teleguard.serve.protocol import SAMPLE_RATE

if TYPE_CHECKING:
    from teleguard.serve.cascade import CascadeEngine
    from teleguard.serve.metrics import DetectorMetrics

log = logging.getLogger(__name__)

EngineKind = Literal["transformers", "vllm", "remote"]
AUDIO_TAG = "<audio>"  # ms-swift's placeholder for one clip in a message's text


class EngineFailure(EngineError):
    """The engine failed to answer (an exception in the model, a bad HTTP status, a refused connection)."""

    kind = "error"


class EngineTimeout(EngineFailure):
    """The engine did not answer within the configured timeout."""

    kind = "timeout"


def error_kind(err: BaseException) -> str:
    """ "timeout" or "error": the label engine errors are counted under."""
    return "timeout" if isinstance(err, EngineTimeout | TimeoutError) else "error"


class EngineConfig(BaseModel):
    """Which engine serves the detector and how it is called. Validated once, when the server starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: EngineKind = "transformers"
    # transformers/vllm: a local model folder (the server resolves s3:// and /mnt/models to one first);
    # remote: the model name the endpoint serves.
    model: str | None = None
    model_type: str | None = (
        None  # ms-swift's model_type / template; read from a tiny model's marker if absent
    )
    template: str | None = None
    adapters: tuple[str, ...] = ()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # remote: the API base URL (".../v1"); the API key is read from the environment variable named here.
    url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int | None = Field(default=None, ge=1)  # caps the policy's max_tokens when set
    temperature: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)  # per engine invocation (one evaluation round)
    max_batch_size: int = Field(default=8, ge=1)  # transformers: requests per batched engine call
    batch_wait_ms: float = Field(default=5.0, ge=0)  # transformers: how long a batch collects requests
    max_concurrency: int = Field(default=64, ge=1)  # remote: requests in flight at once
    engine_options: dict[str, Any] = Field(default_factory=dict)  # passed to ms-swift's engine as is
    # Ask for the generated tokens' log-probabilities: the decisions' confidence is the model's probability of
    # its label (teleguard.contract.confidence). Off (or an endpoint that sends none): the stated confidence.
    logprobs: bool = True
    # A confidence cascade (teleguard.serve.cascade): this engine answers first; the requests whose answer is
    # unsure are asked again of `cascade.large`. None: no cascade.
    cascade: CascadeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _escalation_deadline(cls, data: Any) -> Any:
        """An escalation engine given as a mapping without `timeout_s` gets half of this engine's: the
        escalation must finish inside the deadline of the whole invocation (see `_consistent`)."""
        if isinstance(data, dict) and isinstance(data.get("cascade"), dict):
            cascade = data["cascade"]
            large = cascade.get("large")
            if isinstance(large, dict) and "timeout_s" not in large:
                timeout = data.get("timeout_s", cls.model_fields["timeout_s"].default)
                if isinstance(timeout, int | float) and not isinstance(timeout, bool):
                    data = {**data, "cascade": {**cascade, "large": {**large, "timeout_s": timeout / 2}}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EngineConfig:
        if self.kind == "remote":
            if not self.url:
                raise ValueError(
                    "a remote engine needs 'url' (the OpenAI-compatible API base, e.g. http://host/v1)"
                )
            if not re.match(r"^https?://", self.url):
                raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
            if not self.model:
                raise ValueError("a remote engine needs 'model' (the model name the endpoint serves)")
        elif self.url:
            raise ValueError(f"'url' is for the remote engine only, not {self.kind}")
        if self.kind == "vllm" and self.device == "cpu":
            raise ValueError("the vllm engine runs on a GPU: use the transformers engine on a CPU")
        if self.cascade is not None and self.cascade.large.timeout_s >= self.timeout_s:
            raise ValueError(
                f"cascade.large.timeout_s ({self.cascade.large.timeout_s:g} s) must be shorter than timeout_s "
                f"({self.timeout_s:g} s), the deadline of the whole invocation (small and large engine): "
                "otherwise a slow escalation is a 503 instead of falling back to the small engine's answer"
            )
        return self

    def max_tokens_for(self, request: EngineRequest) -> int:
        return min(request.max_tokens, self.max_tokens) if self.max_tokens else request.max_tokens


class CascadeConfig(BaseModel):
    """A confidence cascade: the engine configured around it (the small one) answers every request first; a
    request whose answer is unsure (confidence below `threshold`, no confidence, or no answer JSON at all) is
    sent to `large`, whose answer is used. If `large` fails or misses its deadline (`large.timeout_s`), the
    small engine's answer stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    large: (
        EngineConfig  # the escalation engine: a remote endpoint or a local model folder (no cascade itself)
    )
    threshold: float = Field(default=0.7, ge=0, le=1)  # escalate when the small answer's confidence is below

    @model_validator(mode="after")
    def _consistent(self) -> CascadeConfig:
        if self.large.cascade is not None:
            raise ValueError("cascades do not nest: the large engine of a cascade has no cascade of its own")
        if self.large.kind != "remote" and not self.large.model:
            raise ValueError(f"a local ({self.large.kind}) large engine needs 'model' (a model folder)")
        return self


EngineConfig.model_rebuild()


# --- audio ---------------------------------------------------------------------------------------------------


def wav_bytes(clip: np.ndarray) -> bytes:
    """A clip as a PCM16 WAV file in memory, as training wrote clips (clipped to [-1, 1])."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(
        buf,
        np.clip(np.asarray(clip, dtype=np.float32), -1.0, 1.0),
        SAMPLE_RATE,
        format="WAV",
        subtype="PCM_16",
    )
    return buf.getvalue()


# --- a deadline on any engine --------------------------------------------------------------------------------


def with_timeout(generate: Generate, timeout_s: float) -> Generate:
    """`generate` with a deadline: EngineTimeout after `timeout_s`; any other exception becomes EngineFailure."""

    async def timed(requests: Sequence[EngineRequest]) -> Sequence[str | Generation]:
        try:
            return await asyncio.wait_for(generate(requests), timeout_s)
        except EngineError:
            raise
        except TimeoutError:
            raise EngineTimeout(
                f"the engine did not answer {len(requests)} request(s) within {timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise EngineFailure(f"the engine failed: {type(err).__name__}: {err}") from err

    return timed


# --- micro-batching for blocking engines ---------------------------------------------------------------------


@dataclass
class _Pending:
    request: EngineRequest
    future: asyncio.Future[Generation]
    queued_at: float = field(default_factory=time.perf_counter)


BatchFn = Callable[[list[EngineRequest]], list[Generation]]


class MicroBatcher:
    """Runs a blocking batch function on one worker thread, batching the requests of concurrent callers.

    A batch starts when the first request arrives and collects further requests for up to `wait_ms` or until
    `max_batch_size` are there, then one call of `batch_fn` answers them all. While a batch runs, new requests
    queue for the next one. A caller that gives up (a timeout cancels its await) does not stop the batch; its
    answer is dropped. `batches` records the size of each batch run (for tests and logs).
    """

    def __init__(self, batch_fn: BatchFn, *, max_batch_size: int = 8, wait_ms: float = 5.0) -> None:
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.batches: list[int] = []
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teleguard-engine")
        self._closed = False

    async def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        if self._closed:
            raise EngineFailure("the engine is shut down")
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="teleguard-micro-batcher")
        pending = [_Pending(r, loop.create_future()) for r in requests]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(p.future for p in pending)))

    __call__ = generate

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    batch.append(
                        queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            live = [p for p in batch if not p.future.done()]  # a caller that timed out is not asked about
            if not live:
                continue
            self.batches.append(len(live))
            try:
                answers = await loop.run_in_executor(self._executor, self.batch_fn, [p.request for p in live])
                if len(answers) != len(live):
                    raise EngineFailure(
                        f"the engine returned {len(answers)} answers for {len(live)} requests"
                    )
            except Exception as err:  # one failed batch fails its callers, not the batcher
                failure = (
                    err if isinstance(err, EngineError) else EngineFailure(f"{type(err).__name__}: {err}")
                )
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(failure)
                continue
            for p, answer in zip(live, answers, strict=True):
                if not p.future.done():
                    p.future.set_result(answer)

    async def aclose(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- ms-swift engines ----------------------------------------------------------------------------------------


def _swift_names(config: EngineConfig) -> tuple[str | None, str | None]:
    """model_type and template: from the config, else from a tiny model's marker file (tests, CPU recipes)."""
    if config.model_type or config.model is None:
        return config.model_type, config.template
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
        else:
            options.setdefault("use_async_engine", True)  # vLLM's continuous batching across calls
            options.setdefault("enable_prefix_caching", True)
        from teleguard.engines import SwiftEngine

        self.swift = SwiftEngine(
            config.model,
            kind=config.kind,
            model_type=model_type,
            template=template,
            adapters=config.adapters,
            max_batch_size=config.max_batch_size,
            engine_options=options,
        )
        # SwiftEngine's own generate() answers texts only; the serving path needs ms-swift's responses (token
        # usage, logprobs) and its async entry point, so it talks to the wrapped ms-swift engine.
        self.engine = self.swift._engine
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
            responses = self.engine.infer(
                [_infer_request(requests[i]) for i in indices],
                self._request_config(max_tokens),
                use_tqdm=False,
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
            response = await self.engine.infer_async(
                _infer_request(request), self._request_config(self.config.max_tokens_for(request))
            )
            return _generation(response)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    __call__ = generate

    async def aclose(self) -> None:
        if self.batcher is not None:
            await self.batcher.aclose()


# --- a remote OpenAI-compatible endpoint ---------------------------------------------------------------------


def openai_messages(request: EngineRequest) -> list[dict[str, Any]]:
    """The request's messages in OpenAI chat format: each `<audio>` tag becomes an input_audio part (WAV)."""
    clips = iter(request.audios)
    out: list[dict[str, Any]] = []
    for message in request.messages:
        content = message["content"]
        if AUDIO_TAG not in content:
            out.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        pieces = content.split(AUDIO_TAG)
        for i, text in enumerate(pieces):
            if text:
                parts.append({"type": "text", "text": text})
            if i < len(pieces) - 1:
                clip = next(clips, None)
                if clip is None:
                    raise EngineFailure("a message has more <audio> tags than the request has clips")
                data = base64.b64encode(wav_bytes(clip)).decode("ascii")
                parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
        out.append({"role": message["role"], "content": parts})
    return out


class RemoteEngine:
    """Chat completions on an OpenAI-compatible endpoint; one HTTP request per prompt, concurrently."""

    def __init__(self, config: EngineConfig) -> None:
        if config.kind != "remote" or not config.url:
            raise ValueError("RemoteEngine needs kind 'remote' and a url")
        import httpx

        self.config = config
        self.url = config.url.rstrip("/") + "/chat/completions"
        headers = {"content-type": "application/json"}
        key = os.environ.get(config.api_key_env)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency),
        )
        self._warned_logprobs = False

    async def _one(self, request: EngineRequest) -> Generation:
        import httpx

        body = {
            "model": self.config.model,
            "messages": openai_messages(request),
            "max_tokens": self.config.max_tokens_for(request),
            "temperature": self.config.temperature,
        }
        if self.config.logprobs:
            body["logprobs"] = True  # the chosen tokens' logprobs, for the confidence; no alternatives
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise EngineTimeout(
                f"{self.url}: no answer within {self.config.timeout_s:g} s ({type(err).__name__})"
            ) from None
        except httpx.HTTPError as err:
            raise EngineFailure(f"{self.url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise EngineFailure(f"{self.url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise EngineFailure(
                f"{self.url}: not a chat-completions answer ({type(err).__name__}: {err})"
            ) from None
        tokens = (data.get("usage") or {}).get("completion_tokens")
        logprobs = token_logprobs(data["choices"][0].get("logprobs")) if self.config.logprobs else None
        if self.config.logprobs and logprobs is None and not self._warned_logprobs:
            self._warned_logprobs = True
            log.warning(
                "%s sent no token logprobs: decisions use the confidence the answers state "
                "(confidence_source 'stated')",
                self.url,
            )
        return Generation(text, tokens if isinstance(tokens, int) else None, logprobs)

    async def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    __call__ = generate

    async def aclose(self) -> None:
        await self.client.aclose()


# --- choosing by configuration -------------------------------------------------------------------------------


ServingEngine = SwiftServingEngine | RemoteEngine


def build_engine(
    config: EngineConfig, *, metrics: DetectorMetrics | None = None
) -> ServingEngine | CascadeEngine:
    """The engine the configuration names. Local engines load the model here: call it off the event loop.

    With `config.cascade` set, a `teleguard.serve.cascade.CascadeEngine` over the small engine (this config
    without its cascade) and the large one; it counts its escalations in `metrics` (the process-wide
    `default_metrics()` unless given or bound later with `CascadeEngine.bind_metrics`).
    """
    if config.cascade is not None:
        from teleguard.serve.cascade import build_cascade

        return build_cascade(config, metrics=metrics)
    if config.kind == "remote":
        return RemoteEngine(config)
    return SwiftServingEngine(config)


async def close_engine(engine: Generate | Any) -> None:
    """Release an engine's resources, whatever kind it is (engines without `aclose` need nothing)."""
    close = getattr(engine, "aclose", None)
    if close is None:
        return
    result = close()
    if isinstance(result, Awaitable):
        await result
