"""Inference engines behind one interface, for rejection sampling and evaluation.

Both engines are ms-swift's (`TransformersEngine` on CPU or GPU, `VllmEngine` on GPU), so generation applies the
same chat template as training, audio included (the Qwen2-Audio plugin is imported first for audio models).

`SwiftEngine.generate` answers texts; `SwiftEngine.generate_completions` also returns the generated tokens'
log-probabilities, from which `Completion.confidence` reads the model's probability of the label an answer
gives, by the same definition the detector uses (`teleguard.contract.confidence`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from teleguard.contract.confidence import TokenLogprob, label_probability, token_logprobs
from teleguard.contract.labels import Round

EngineKind = Literal["transformers", "vllm"]


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


class SwiftEngine:
    """An ms-swift inference engine over a model folder (and optionally LoRA adapters)."""

    def __init__(
        self,
        model: str | Path,
        *,
        kind: EngineKind = "transformers",
        model_type: str | None = None,
        template: str | None = None,
        adapters: Sequence[str] = (),
        media_root: str | Path | None = None,
        max_batch_size: int = 16,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if media_root is not None:
            # ms-swift resolves relative audio paths in rows against ROOT_IMAGE_DIR.
            os.environ["ROOT_IMAGE_DIR"] = str(media_root)
        if model_type == "qwen2_audio":
            import teleguard.plugins.swift_qwen2_audio  # noqa: F401  (registers the transformers-5 fixes)
        options = dict(engine_options or {})
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
            from swift.infer_engine import VllmEngine

            if adapters:
                options.setdefault("enable_lora", True)
            self._engine = VllmEngine(str(model), model_type=model_type, template_type=template, **options)
            self._adapters = list(adapters)
        else:
            raise ValueError(f"unknown engine kind {kind!r}; choose transformers or vllm")
        self.kind = kind

    def _infer(self, prompts: Sequence[Prompt], params: SamplingParams, *, logprobs: bool) -> list[Any]:
        from swift.infer_engine import InferRequest, RequestConfig

        requests = [InferRequest(messages=p.messages, audios=list(p.audios)) for p in prompts]
        config = RequestConfig(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_tokens,
            seed=params.seed,
            logprobs=logprobs,
        )
        return self._engine.infer(requests, config, use_tqdm=len(requests) > 1)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        responses = self._infer(prompts, params, logprobs=False)
        return [[choice.message.content or "" for choice in r.choices] for r in responses]

    def generate_completions(
        self, prompts: Sequence[Prompt], params: SamplingParams
    ) -> list[list[Completion]]:
        """As `generate`, with each completion's token log-probabilities (for `Completion.confidence`).

        Costs more than `generate` on the transformers engine (it keeps every step's logits), so sampling
        that only needs texts calls `generate`.
        """
        responses = self._infer(prompts, params, logprobs=True)
        return [
            [Completion(c.message.content or "", token_logprobs(c.logprobs)) for c in r.choices]
            for r in responses
        ]


def recipe_engine(
    recipe: Any, model: str | Path, datasets: Path, *, kind: EngineKind, batch_size: int
) -> SwiftEngine:
    """The engine for a recipe's model family; audio rows resolve their clips against the dataset folder."""
    return SwiftEngine(
        model,
        kind=kind,
        model_type=recipe.model.model_type,
        template=recipe.model.template,
        media_root=datasets if recipe.data.modality == "audio" else None,
        max_batch_size=batch_size,
    )


def prompt_of_row(row: dict[str, Any]) -> Prompt:
    """The prompt of an ms-swift row: its messages up to the last user turn, and its audio."""
    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return Prompt(messages=messages, audios=list(row.get("audios") or []))
