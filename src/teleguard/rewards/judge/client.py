"""The judge's HTTP client: chat completions with timeouts, retries, a shared rate limit, and the API key."""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

from teleguard.rewards.judge.config import JudgeConfig

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge could not score (messages never carry the API key)."""

    reason = "error"


class JudgeTimeout(JudgeError):
    reason = "timeout"


class JudgeHTTPError(JudgeError):
    reason = "http"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JudgeUnparsable(JudgeError):
    reason = "unparsable"


class RateLimiter:
    """At most `rate` acquisitions per second, spaced evenly, for every thread that shares the instance.

    N acquisitions take at least (N - 1) / rate seconds; the first is immediate.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


_limiters: dict[tuple[str, float], RateLimiter] = {}
_limiters_lock = threading.Lock()


def shared_rate_limiter(base_url: str, rate: float) -> RateLimiter:
    """The process-wide limiter for an endpoint and rate (every Judge of the process shares it)."""
    with _limiters_lock:
        return _limiters.setdefault((base_url, rate), RateLimiter(rate))


_COUNTERS = (
    "samples",  # completions scored (cache hits included)
    "cache_hits",  # samples answered from the cache
    "judged",  # fresh judgements (unique within a batch)
    "calls",  # HTTP requests sent (retries included)
    "retries",  # of those, repeated attempts
    "timeouts",  # attempts that timed out
    "http_errors",  # attempts answered with an HTTP error status
    "transport_errors",  # attempts that failed to connect or lost the connection
    "unparsable",  # answers without a score
    "fallbacks",  # samples that got fallback_reward
    "fallback_timeout",
    "fallback_http",
    "fallback_unparsable",
    "fallback_error",
    "cache_writes",
    "cache_errors",
)


class JudgeStats:
    """Thread-safe counters of one process (cumulative)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class JudgeClient:
    """Chat completions with timeouts, retries (exponential backoff with jitter), a rate limit, and the key."""

    RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))

    def __init__(
        self, config: JudgeConfig, stats: JudgeStats, environ: Mapping[str, str] | None = None
    ) -> None:
        import httpx

        self.config = config
        self.stats = stats
        self.url = f"{config.base_url}/chat/completions"
        env = os.environ if environ is None else environ
        self._key = env.get(config.api_key_env) or ""
        headers = {"content-type": "application/json"}
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
            ),
        )
        self.limiter = (
            shared_rate_limiter(config.base_url, config.rate_limit_per_s) if config.rate_limit_per_s else None
        )
        self._random = random.Random()

    def redact(self, text: str) -> str:
        """`text` with the API key replaced (servers may echo what they were sent)."""
        return text.replace(self._key, "***") if self._key else text

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        backoff = self.config.backoff_s * 2 ** (attempt - 1) * self._random.uniform(0.5, 1.0)
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(backoff, self.config.max_backoff_s)

    def chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST one chat completion and return its JSON; raises JudgeError when every attempt failed."""
        import httpx

        error: JudgeError = JudgeError("no attempt made")
        retry_after: float | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats.add("retries")
                delay = self._wait(attempt, retry_after)
                log.debug("judge: retry %d after %.2f s (%s)", attempt, delay, error)
                time.sleep(delay)
            retry_after = None
            if self.limiter is not None:
                self.limiter.acquire()
            self.stats.add("calls")
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException as err:
                self.stats.add("timeouts")
                error = JudgeTimeout(
                    f"{self.url}: no answer within {self.config.timeout_s:g} s ({type(err).__name__})"
                )
                continue
            except httpx.HTTPError as err:
                self.stats.add("transport_errors")
                error = JudgeError(self.redact(f"{self.url}: {type(err).__name__}: {err}"))
                continue
            if response.status_code == 200:
                try:
                    data = response.json()
                except ValueError:
                    raise JudgeUnparsable(f"{self.url}: the answer is not JSON") from None
                if not isinstance(data, dict):
                    raise JudgeUnparsable(f"{self.url}: the answer is not a JSON object")
                return data
            self.stats.add("http_errors")
            error = JudgeHTTPError(
                self.redact(f"{self.url} answered HTTP {response.status_code}: {response.text[:300]}"),
                response.status_code,
            )
            if response.status_code not in self.RETRY_STATUS:
                raise error
            retry_after = _retry_after(response.headers.get("retry-after"))
        raise error

    def close(self) -> None:
        self.client.close()
