"""A remote OpenAI-compatible chat-completions endpoint (vLLM's server, KServe's OpenAI route, ...) as a serving
engine, over httpx. Clips go as ``input_audio`` parts carrying base64 WAV; the generated tokens'
log-probabilities are asked for when `EngineConfig.logprobs` is on (an endpoint that sends none leaves the
decisions on the confidence the answers state)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Sequence
from typing import Any

from teleguard.contract.confidence import token_logprobs
from teleguard.engines.audio import AUDIO_TAG, wav_bytes
from teleguard.engines.contract import EngineConfig, EngineFailure, EngineRequest, EngineTimeout, Generation

log = logging.getLogger(__name__)


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
