"""The Judge: scores batches of samples, from the cache first, then with concurrent requests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from teleguard.rewards.judge.cache import JudgementCache, write_stats
from teleguard.rewards.judge.client import JudgeClient, JudgeError, JudgeStats, JudgeUnparsable
from teleguard.rewards.judge.config import CRITERIA, JudgeConfig
from teleguard.rewards.judge.rubric import PROMPT_VERSION, JudgeItem, judge_messages, message_text
from teleguard.rewards.judge.scoring import score_from_logprobs, score_from_text

log = logging.getLogger(__name__)


@dataclass
class Judgement:
    """The judge's verdict on one sample. `reward` is on the 0..1 scale."""

    reward: float
    scores: dict[str, float] = field(default_factory=dict)  # criterion -> 1..5 (expected value)
    sources: dict[str, str] = field(default_factory=dict)  # criterion -> "logprobs" | "text"
    fallback: bool = False
    cached: bool = False
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "reward": self.reward,
            "scores": self.scores,
            "sources": self.sources,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class _Scored:
    score: float
    source: str
    raw: dict[str, Any]


class Judge:
    """Scores batches of `JudgeItem`s: cache first, then concurrent requests (three per unique sample)."""

    def __init__(self, config: JudgeConfig, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = environ
        self.stats = JudgeStats()
        self.client = JudgeClient(config, self.stats, environ)
        self.cache = JudgementCache(config.cache, environ=environ) if config.cache else None
        self._pool = ThreadPoolExecutor(
            max_workers=config.max_concurrency, thread_name_prefix="teleguard-judge"
        )

    # --- requests and keys

    def bodies(self, item: JudgeItem) -> dict[str, dict[str, Any]]:
        """The request body of each criterion (the API key is not part of it)."""
        c = self.config
        out = {}
        for criterion in CRITERIA:
            body: dict[str, Any] = {
                "model": c.model,
                "messages": judge_messages(item, criterion, c),
                "max_tokens": c.max_tokens,
                "temperature": c.temperature,
                "stream": False,
            }
            if c.logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = c.top_logprobs
            out[criterion] = body
        return out

    @staticmethod
    def key(bodies: Mapping[str, Mapping[str, Any]]) -> str:
        """Content hash of a judgement: prompt version + the exact request bodies (model, prompts, sampling)."""
        payload = json.dumps(
            {"version": PROMPT_VERSION, "bodies": bodies}, ensure_ascii=False, sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _score(self, body: Mapping[str, Any]) -> _Scored:
        data = self.client.chat(body)
        try:
            choice = data["choices"][0]
            content = (choice.get("message") or {}).get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeUnparsable(f"{self.client.url}: not a chat-completions answer") from None
        content_text = content if isinstance(content, str) else message_text(content)
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if self.config.logprobs and isinstance(logprobs, dict):
            expected = score_from_logprobs(logprobs.get("content"))
            if expected is not None:
                score, probs = expected
                raw = {"content": content_text[-200:], "probs": {str(k): v for k, v in probs.items()}}
                return _Scored(score, "logprobs", raw)
        parsed = score_from_text(content_text)
        if parsed is None:
            raise JudgeUnparsable(
                f"the judge's answer holds no score 1..5: {self.client.redact(content_text[-120:])!r}"
            )
        return _Scored(float(parsed), "text", {"content": content_text[-200:]})

    # --- batches

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        """One judgement per item, in order. Never raises for the judge's failures (they get the fallback)."""
        started = time.perf_counter()
        before = self.stats.snapshot()
        keys: list[str] = []
        bodies: dict[str, dict[str, dict[str, Any]]] = {}
        results: dict[str, Judgement] = {}
        for item in items:
            item_bodies = self.bodies(item)
            key = self.key(item_bodies)
            keys.append(key)
            if key in bodies or key in results:
                continue
            cached = self._cache_get(key)
            if cached is not None:
                results[key] = cached
            else:
                bodies[key] = item_bodies

        futures = {
            (key, criterion): self._pool.submit(self._score, body)
            for key, item_bodies in bodies.items()
            for criterion, body in item_bodies.items()
        }
        for key in bodies:
            judgement = self._collect(key, {c: futures[(key, c)] for c in CRITERIA})
            results[key] = judgement
            if not judgement.fallback:
                self.stats.add("judged")
                self._cache_put(key, judgement)

        out = []
        for key in keys:
            j = results[key]
            self.stats.add("samples")
            if j.cached:
                self.stats.add("cache_hits")
            if j.fallback:
                self.stats.add("fallbacks")
                self.stats.add(f"fallback_{j.raw.get('reason', 'error')}")
            out.append(j)
        self._report(len(items), before, time.perf_counter() - started)
        return out

    def _collect(self, key: str, futures: Mapping[str, Any]) -> Judgement:
        scored: dict[str, _Scored] = {}
        failure: JudgeError | None = None
        for criterion, future in futures.items():
            try:
                scored[criterion] = future.result()
            except JudgeError as err:
                failure = failure or err
            except Exception as err:  # a bug or an unexpected answer must not stop training
                failure = failure or JudgeError(self.client.redact(f"{type(err).__name__}: {err}"))
        if failure is not None:
            if isinstance(failure, JudgeUnparsable):
                self.stats.add("unparsable")
            log.warning(
                "judge: fallback reward %.2f for one sample: %s", self.config.fallback_reward, failure
            )
            return Judgement(
                reward=self.config.fallback_reward,
                fallback=True,
                error=str(failure),
                raw={"reason": failure.reason},
                key=key,
            )
        scores = {c: scored[c].score for c in CRITERIA}
        return Judgement(
            reward=self._reward(scores),
            scores=scores,
            sources={c: scored[c].source for c in CRITERIA},
            raw={c: scored[c].raw for c in CRITERIA},
            key=key,
        )

    def _reward(self, scores: Mapping[str, float]) -> float:
        return self.config.weights.combine({c: (scores[c] - 1.0) / 4.0 for c in CRITERIA})

    def _cache_get(self, key: str) -> Judgement | None:
        if self.cache is None:
            return None
        try:
            value = self.cache.get(key)
        except Exception as err:  # an unreachable cache only costs requests
            self.stats.add("cache_errors")
            log.warning("judge cache: read failed (%s)", self.client.redact(str(err)))
            return None
        if value is None:
            return None
        try:
            scores = {c: float(value["scores"][c]) for c in CRITERIA}
        except (KeyError, TypeError, ValueError):
            return None
        # The reward is recomputed so that a change of weights applies to cached judgements too.
        return Judgement(
            reward=self._reward(scores),
            scores=scores,
            sources=dict(value.get("sources") or {}),
            cached=True,
            raw=dict(value.get("raw") or {}),
            key=key,
        )

    def _cache_put(self, key: str, judgement: Judgement) -> None:
        if self.cache is None:
            return
        value = {
            **judgement.to_json(),
            "model": self.config.model,
            "prompt_version": PROMPT_VERSION,
            "weights": self.config.weights.model_dump(),
            "created": time.time(),
        }
        try:
            self.cache.put(key, value)
            self.stats.add("cache_writes")
        except Exception as err:
            self.stats.add("cache_errors")
            log.warning("judge cache: write failed (%s)", self.client.redact(str(err)))

    def _report(self, n: int, before: Mapping[str, int], seconds: float) -> None:
        now = self.stats.snapshot()
        delta = {k: now[k] - before.get(k, 0) for k in now}
        log.info(
            "judge: %d samples in %.2f s: %d from cache, %d calls, %d retries, %d timeouts, %d fallbacks "
            "(process totals: %d samples, %d from cache, %d calls, %d fallbacks)",
            n,
            seconds,
            delta["cache_hits"],
            delta["calls"],
            delta["retries"],
            delta["timeouts"],
            delta["fallbacks"],
            now["samples"],
            now["cache_hits"],
            now["calls"],
            now["fallbacks"],
        )
        stats_dir = self.config.resolved_stats_dir
        if not stats_dir:
            return
        payload = {
            "model": self.config.model,
            "base_url": self.config.base_url,
            "prompt_version": PROMPT_VERSION,
            "fallback_reward": self.config.fallback_reward,
            "rank": os.environ.get("RANK", "0"),
            "pid": os.getpid(),
            "updated": time.time(),
            "counters": now,
        }
        try:
            write_stats(stats_dir, payload, environ=self.environ)
        except Exception as err:
            log.warning("judge: could not write stats under %s (%s)", stats_dir, self.client.redact(str(err)))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
