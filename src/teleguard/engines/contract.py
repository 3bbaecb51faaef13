"""The one engine contract: what sampling, evaluation and serving hand an engine and what they get back.

Sampling and evaluation (synchronous, whole batches): a `Prompt` per row, `SamplingParams`, and `n` texts per
prompt (`Engine.generate`), or `Completion`s with their tokens' log-probabilities.

Serving (asynchronous, one call's rounds at a time): `EngineRequest`s in, one `Generation` (or plain text) per
request out, through any `Generate` function; `EngineConfig` names the engine (`EngineKind`) and how it is
called, `CascadeConfig` a confidence cascade around it. Failures are `EngineError`s: `EngineFailure` (counted
as "error") and `EngineTimeout` ("timeout"), told apart by `error_kind`.

Nothing here loads a model: the engines themselves live beside this module and are built by
`teleguard.engines.factory.build_engine` (serving) or `teleguard.engines.swift.SwiftEngine` (sampling).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from teleguard.contract.confidence import TokenLogprob, label_probability
from teleguard.contract.labels import Round

# transformers / vllm: ms-swift's engines on a local model folder; remote: an OpenAI-compatible endpoint
# (serving only: sampling and evaluation run a local model).
EngineKind = Literal["transformers", "vllm", "remote"]
# Where a local engine runs; auto: CUDA if present. vllm on cpu needs vLLM's CPU build (`make setup`).
EngineDevice = Literal["auto", "cpu", "cuda"]


# --- sampling and evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 512
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A chat prompt (messages ending with the user's turn) and its audio clips."""

    messages: list[dict[str, Any]]
    audios: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    """One generated answer and its tokens' (text, logprob) pairs (None: the engine reported none)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None

    def confidence(self, round_: Round | str) -> float | None:
        """The model's probability of the label this answer gives for `round_` (None: no label span, or no
        log-probabilities); the detector's confidence, `teleguard.contract.confidence.label_probability`."""
        if self.logprobs is None:
            return None
        return label_probability(self.text, self.logprobs, round_).probability


class Engine(Protocol):
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        """`params.n` completions for each prompt, in order."""
        ...


def prompt_of_row(row: dict[str, Any]) -> Prompt:
    """The prompt of an ms-swift row: its messages up to the last user turn, and its audio."""
    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return Prompt(messages=messages, audios=list(row.get("audios") or []))


# --- serving -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRequest:
    """One chat prompt for the engine. `audios` are the clips its `<audio>` tags stand for, in order:
    float32 arrays of shape (samples, 2) at 16 kHz."""

    call_id: str
    round: Round
    messages: list[dict[str, str]]
    audios: tuple[np.ndarray, ...] = ()
    max_tokens: int = 1024


@dataclass(frozen=True)
class Generation:
    """An engine's answer with the number of tokens it generated (engines that know it return this) and the
    generated tokens' (text, logprob) pairs in order, from which the policy reads the answer's confidence
    (`teleguard.contract.confidence`); None: the engine reported no log-probabilities."""

    text: str
    tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


Generate = Callable[[Sequence[EngineRequest]], Awaitable[Sequence[str | Generation]]]


class EngineError(RuntimeError):
    """The engine answered something other than one text per request."""


class EngineFailure(EngineError):
    """The engine failed to answer (an exception in the model, a bad HTTP status, a refused connection)."""

    kind = "error"


class EngineTimeout(EngineFailure):
    """The engine did not answer within the configured timeout."""

    kind = "timeout"


def error_kind(err: BaseException) -> str:
    """ "timeout" or "error": the label engine errors are counted under."""
    return "timeout" if isinstance(err, EngineTimeout | TimeoutError) else "error"


def as_generations(answers: Sequence[Any], expected: int) -> list[Generation]:
    """An engine's answers as Generations, one per request; EngineError when the count or a type is wrong."""
    if len(answers) != expected:
        raise EngineError(f"the engine returned {len(answers)} answers for {expected} requests")
    out = []
    for answer in answers:
        if isinstance(answer, str):
            out.append(Generation(answer))
        elif isinstance(answer, Generation):
            out.append(answer)
        else:
            raise EngineError(f"the engine returned a {type(answer).__name__}, not str or Generation")
    return out


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
    adapters: tuple[str, ...] = ()  # LoRA adapter folders (vllm: at most one, ms-swift's limit)
    device: EngineDevice = "auto"
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
    # A confidence cascade (teleguard.engines.cascade): this engine answers first; the requests whose answer
    # is unsure are asked again of `cascade.large`. None: no cascade.
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
