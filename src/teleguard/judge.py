"""Teacher-judge reward: an LLM behind an OpenAI-compatible endpoint scores the policy's reasoning.

SAFE-QAQ mixes its rule rewards with a teacher's opinion of the reasoning. Here the teacher is any
OpenAI-compatible chat endpoint (a local `swift deploy`, vLLM, DeepSeek's API...). For every completion it
scores the `<think>` reasoning and the answer against the reference (the round's gold label and, when the
dataset has a `reference` or `reason` column, a reference rationale) on three TeleAntiFraud-style criteria,
each 1 to 5:

- logical rigour (`logical_rigour`): reasoning grounded in the call, consistent, reaching the reference label;
- practical value (`practical_value`): concrete fraud cues a listener could act on;
- expression quality (`expression_quality`): clear, concise, well-formed output.

**One request per criterion**, `max_tokens: 1`, `temperature: 0`, `logprobs: true`, `top_logprobs: 5`: the
criterion's score is the EXPECTED VALUE of the score over the probabilities of the tokens "1".."5" among the
top log-probabilities of the first score token (renormalised over those five; G-Eval style). Without logprobs
(a server that ignores them, or `logprobs: false` for endpoints that refuse them, e.g. reasoning models) the
score is the first integer 1..5 in the answer text (a `<think>` block is skipped; give such models room with
`max_tokens`). One call per criterion was chosen over one call returning three numbers because it works with
every server checked: ms-swift 4.6's deploy server (transformers backend, CPU included) returns `logprobs`
for the generated token only, so one token per criterion keeps the probabilities exactly where the score is.

Each score s is normalised to (s - 1) / 4 in 0..1 and the three are combined with the rubric weights
(normalised to sum 1). The reward function `teacher_judge` returns that 0..1 judgement times
`teleguard.rewards.CORRECT` (5.0), the scale of the rule rewards, so a GRPO run's `--reward_weights 0.6 0.4`
for (rule, teacher) mixes quantities of the same scale (ms-swift sums weight x reward without normalising,
as `mix_rewards` does).

**Fallback.** When the judge cannot answer for a sample (timeouts or retries exhausted, an HTTP error, an
answer with no score in it) the sample gets `JudgeConfig.fallback_reward` (default 0.5 on the 0..1 scale:
neutral, i.e. 2.5 after scaling) so that a flaky endpoint neither rewards nor punishes the policy; such
results are counted and NOT cached, so a rerun asks again.

**Configuration** comes from the environment because the reward runs inside the ms-swift training
subprocess: `TELEGUARD_JUDGE_CONFIG` holds `JudgeConfig` as JSON (`JudgeConfig.to_env()` makes it), and the
API key is read from the variable it names (`api_key_env`, default `TELEGUARD_JUDGE_API_KEY`). The key is
sent as `Authorization: Bearer ...` and appears nowhere else: not in the config, logs, errors, cache or stats.

**Cache** (`teleguard.judge_cache`): judgements are stored by a sha256 over the prompt version and the exact
request bodies (judge model, rubric prompts, call context, reference, completion, sampling parameters), so a
rerun over the same completions makes no request at all.

**Counters** (served from cache, calls, retries, timeouts, fallbacks...) are logged after every batch and
written to `<stats_dir>/judge-stats-rank<R>-pid<P>.json` (default `<cache>/stats`); `read_stats` sums them.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teleguard.contract.parser import parse_output
from teleguard.judge_cache import STATS_DIR, JudgementCache, read_stats, write_stats
from teleguard.loopback import free_port

__all__ = [
    "API_KEY_ENV",
    "CONFIG_ENV",
    "CRITERIA",
    "PROMPT_VERSION",
    "TEACHER_SCALE",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "JudgeItem",
    "Judgement",
    "RateLimiter",
    "RubricWeights",
    "get_judge",
    "local_judge_server",
    "mix_rewards",
    "read_stats",
    "score_from_logprobs",
    "score_from_text",
    "teacher_judge",
]

log = logging.getLogger(__name__)

CONFIG_ENV = "TELEGUARD_JUDGE_CONFIG"
API_KEY_ENV = "TELEGUARD_JUDGE_API_KEY"
PROMPT_VERSION = "teleantifraud-rubric-v1"  # bump when the prompts change meaning (it is part of cache keys)
TEACHER_SCALE = 5.0  # == teleguard.rewards.CORRECT (checked in teacher_judge)
SCORES = (1, 2, 3, 4, 5)

Criterion = Literal["logical_rigour", "practical_value", "expression_quality"]
CRITERIA: tuple[Criterion, ...] = ("logical_rigour", "practical_value", "expression_quality")


# ---------------------------------------------------------------------------------------------- configuration


class RubricWeights(BaseModel):
    """Weights of the three criteria (non-negative, normalised to sum 1 when combined)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    logical_rigour: float = Field(1.0, ge=0)
    practical_value: float = Field(1.0, ge=0)
    expression_quality: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> RubricWeights:
        if self.logical_rigour + self.practical_value + self.expression_quality <= 0:
            raise ValueError("at least one rubric weight must be positive")
        return self

    def combine(self, normalised: Mapping[str, float]) -> float:
        """Weighted mean of per-criterion scores already on the 0..1 scale."""
        weights = self.model_dump()
        return sum(weights[c] * normalised[c] for c in CRITERIA) / sum(weights.values())


class JudgeConfig(BaseModel):
    """Where the teacher judge is and how to talk to it. Holds the NAME of the key's variable, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str  # OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1 or https://api.deepseek.com/v1
    model: str  # the served model name sent in each request
    api_key_env: str = API_KEY_ENV  # variable holding the key (unset: no Authorization header)
    timeout_s: float = Field(30.0, gt=0)  # httpx timeout per phase (connect, write, read, pool) of a request
    max_retries: int = Field(3, ge=0)  # extra attempts after timeouts, transport errors, 429 and 5xx
    backoff_s: float = Field(1.0, ge=0)  # retry k waits backoff_s * 2**(k-1) * U(0.5, 1) (or Retry-After)
    max_backoff_s: float = Field(60.0, ge=0)  # cap on any single wait, Retry-After included
    rate_limit_per_s: float | None = Field(None, gt=0)  # requests per second, shared by a process's threads
    max_concurrency: int = Field(8, ge=1)  # requests in flight at once (thread pool and connection pool)
    cache: str | None = None  # folder or s3:// URI for judgements (None: no cache)
    stats_dir: str | None = None  # folder or URI for per-process counters (default: <cache>/stats)
    # The 0..1 reward of a sample the judge could not score (timeouts/retries exhausted, HTTP error,
    # unparsable answer). 0.5 is neutral: it neither rewards nor punishes the policy. Never cached.
    fallback_reward: float = Field(0.5, ge=0, le=1)
    weights: RubricWeights = Field(default_factory=RubricWeights)
    language: Literal["zh", "en"] = "zh"  # language of the rubric prompts
    logprobs: bool = True  # ask for logprobs and score by expected value (False: parse the integer)
    top_logprobs: int = Field(5, ge=1, le=20)
    max_tokens: int = Field(1, ge=1)  # 1 suits instruction models; reasoning models need room to think
    temperature: float = Field(0.0, ge=0)
    max_context_chars: int = Field(4000, ge=0)  # call context shown to the judge (head and tail kept)
    max_completion_chars: int = Field(4000, ge=100)  # reasoning/answer shown to the judge

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("api_key_env must be the NAME of an environment variable (the key stays there)")
        return value

    @property
    def resolved_stats_dir(self) -> str | None:
        if self.stats_dir:
            return self.stats_dir
        return f"{self.cache.rstrip('/')}/{STATS_DIR}" if self.cache else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JudgeConfig:
        """The config in `TELEGUARD_JUDGE_CONFIG` (JSON); ValueError naming the variable if unset or invalid."""
        env = os.environ if environ is None else environ
        raw = env.get(CONFIG_ENV)
        if not raw:
            raise ValueError(
                f"the teacher_judge reward needs {CONFIG_ENV} (JudgeConfig as JSON, see JudgeConfig.to_env())"
            )
        try:
            return cls.model_validate_json(raw)
        except ValueError as err:
            raise ValueError(f"{CONFIG_ENV} is not a valid JudgeConfig: {err}") from None

    def to_env(self) -> dict[str, str]:
        """{TELEGUARD_JUDGE_CONFIG: JSON}: add it to the environment of the training subprocess."""
        return {CONFIG_ENV: self.model_dump_json()}


# ------------------------------------------------------------------------------------------------------ rubric

_PROMPTS: dict[str, dict[str, Any]] = {
    "zh": {
        "system": "你是电话反诈领域的资深审核专家，负责评价反诈检测模型对通话的推理质量。你只输出一个数字。",
        "context": "## 通话与提问\n{context}",
        "reference": "## 参考答案\n正确结论：{gold}\n通话阶段：{stage}",
        "rationale": "参考理由：{reference}",
        "output": "## 待评价的模型输出\n推理过程：\n{think}\n\n最终回答：\n{answer}",
        "criterion": "## 评价维度：{title}\n{description}\n\n评分标准：1 = 很差，2 = 较差，3 = 一般，4 = 良好，5 = 优秀。\n"
        "请只输出一个 1 到 5 之间的整数，不要输出任何其他内容。",
        "none": "（无）",
        "criteria": {
            "logical_rigour": (
                "逻辑严谨性",
                "推理是否以通话内容为依据、论证前后一致、没有自相矛盾或凭空臆断，并且得出与参考答案一致的结论。",
            ),
            "practical_value": (
                "实用价值",
                "推理是否指出了可据以识别诈骗或确认正常的具体线索（如冒充身份、索要验证码、诱导转账），"
                "对用户防范诈骗是否有实际帮助。",
            ),
            "expression_quality": (
                "表达质量",
                "表达是否清晰、简洁、有条理，没有重复和乱码，并符合输出格式（<think> 推理后接 <answer> JSON）。",
            ),
        },
    },
    "en": {
        "system": "You are a senior reviewer of phone-fraud detection. You rate a detector's reasoning about a "
        "call. You answer with a single digit.",
        "context": "## Call and question\n{context}",
        "reference": "## Reference\nCorrect conclusion: {gold}\nConversation stage: {stage}",
        "rationale": "Reference rationale: {reference}",
        "output": "## Output to rate\nReasoning:\n{think}\n\nFinal answer:\n{answer}",
        "criterion": "## Criterion: {title}\n{description}\n\nScale: 1 = very poor, 2 = poor, 3 = fair, "
        "4 = good, 5 = excellent.\nAnswer with one integer from 1 to 5 and nothing else.",
        "none": "(none)",
        "criteria": {
            "logical_rigour": (
                "logical rigour",
                "Is the reasoning grounded in the call, consistent, free of contradictions and unsupported "
                "claims, and does it reach the reference conclusion?",
            ),
            "practical_value": (
                "practical value",
                "Does the reasoning name concrete cues that identify fraud or confirm a normal call "
                "(impersonation, requests for codes, pressure to transfer money) that would help a listener?",
            ),
            "expression_quality": (
                "expression quality",
                "Is it clear, concise and orderly, without repetition or garbage, in the required format "
                "(<think> reasoning, then an <answer> JSON)?",
            ),
        },
    },
}


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees of one sample."""

    completion: Any
    gold: Any
    stage: Any = None
    reference: Any = None  # a reference rationale, if the dataset has one
    context: Any = None  # the sample's `messages` (the prompt the policy answered)


def _text(content: Any) -> str:
    """Message content as text: strings, OpenAI parts (text kept, media as placeholders), nested lists."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "text" in content:
            return _text(content["text"])
        if "content" in content:
            return _text(content["content"])
        kind = str(content.get("type", "media"))
        return f"[{kind}]"
    if isinstance(content, list | tuple):
        return "".join(_text(part) for part in content)
    return str(content)


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail, joined by an ellipsis."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = limit * 2 // 3
    tail = limit - head - 1
    return text[:head] + "…" + (text[-tail:] if tail > 0 else "")


def _context(messages: Any, completion: str, limit: int) -> str:
    """The conversation the policy answered, without the system prompt and the completion ms-swift appends."""
    if not isinstance(messages, list | tuple) or not messages:
        return ""
    turns = [m for m in messages if isinstance(m, dict)]
    if turns and turns[-1].get("role") == "assistant" and _text(turns[-1].get("content")) == completion:
        turns = turns[:-1]
    lines = [
        f"{m.get('role', 'user')}: {_text(m.get('content'))}" for m in turns if m.get("role") != "system"
    ]
    return _clip("\n".join(lines), limit)


def judge_messages(item: JudgeItem, criterion: Criterion, config: JudgeConfig) -> list[dict[str, str]]:
    """The chat messages asking the judge to score `item` on one criterion."""
    p = _PROMPTS[config.language]
    completion = _text(item.completion)
    parsed = parse_output(completion)
    think = parsed.think if parsed.think is not None else ""
    answer = parsed.answer_text if parsed.answer_text is not None else ""
    if parsed.think is None and parsed.answer_text is None:
        answer = completion  # no tags at all: show the whole output as the answer
    half = config.max_completion_chars // 2
    parts = []
    context = _context(item.context, completion, config.max_context_chars)
    if context:
        parts.append(p["context"].format(context=context))
    reference = p["reference"].format(
        gold=_text(item.gold) if not isinstance(item.gold, bool) else str(item.gold).lower(),
        stage=_text(item.stage) or p["none"],
    )
    if item.reference not in (None, ""):
        reference += "\n" + p["rationale"].format(reference=_clip(_text(item.reference), half))
    parts.append(reference)
    parts.append(
        p["output"].format(think=_clip(think, half) or p["none"], answer=_clip(answer, half) or p["none"])
    )
    title, description = p["criteria"][criterion]
    parts.append(p["criterion"].format(title=title, description=description))
    return [{"role": "system", "content": p["system"]}, {"role": "user", "content": "\n\n".join(parts)}]


# ------------------------------------------------------------------------------------------ reading a score

_FULLWIDTH = str.maketrans("１２３４５", "12345")
_THINK_BLOCK = re.compile(r"<think>[\s\S]*?</think>|<think>[\s\S]*$")
_SCORE_IN_TEXT = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def _score_token(token: Any) -> int | None:
    if not isinstance(token, str):
        return None
    t = token.strip().translate(_FULLWIDTH)
    return int(t) if t in ("1", "2", "3", "4", "5") else None


def score_from_logprobs(entries: Any) -> tuple[float, dict[int, float]] | None:
    """Expected score over P("1".."5") at the first generated score token (renormalised), with the probs.

    `entries` is `choices[0].logprobs.content`: one entry per generated token, each with `token`,
    `logprob` and `top_logprobs`. The position used is the first whose token is a score; if none is, the
    first position (its alternatives may still hold score tokens). None when no score token is there.
    """
    if not isinstance(entries, list) or not entries:
        return None
    entry = next(
        (e for e in entries if isinstance(e, dict) and _score_token(e.get("token")) is not None), entries[0]
    )
    if not isinstance(entry, dict):
        return None
    logprobs: dict[str, float] = {}
    for alt in entry.get("top_logprobs") or []:
        if isinstance(alt, dict) and isinstance(alt.get("logprob"), int | float):
            logprobs.setdefault(alt.get("token"), float(alt["logprob"]))
    if isinstance(entry.get("logprob"), int | float):
        logprobs.setdefault(entry.get("token"), float(entry["logprob"]))
    probs: dict[int, float] = {}
    for token, lp in logprobs.items():
        score = _score_token(token)
        if score is not None and math.isfinite(lp):
            probs[score] = probs.get(score, 0.0) + math.exp(lp)
    mass = sum(probs.values())
    if mass <= 0:
        return None
    return sum(s * p for s, p in probs.items()) / mass, {s: p for s, p in sorted(probs.items())}


def score_from_text(content: Any) -> int | None:
    """The first integer 1..5 standing alone in the answer text, after any <think> block; else None."""
    if not isinstance(content, str):
        return None
    match = _SCORE_IN_TEXT.search(_THINK_BLOCK.sub(" ", content).translate(_FULLWIDTH))
    return int(match.group(1)) if match else None


# -------------------------------------------------------------------------------------------------- client


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


# --------------------------------------------------------------------------------------------------- judge


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
        content_text = content if isinstance(content, str) else _text(content)
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


# ---------------------------------------------------------------------------------------- the reward function

_judge: Judge | None = None
_judge_source: str | None = None
_judge_lock = threading.Lock()


def get_judge(environ: Mapping[str, str] | None = None) -> Judge:
    """The process's Judge, built from TELEGUARD_JUDGE_CONFIG (rebuilt if the variable changes)."""
    global _judge, _judge_source
    env = os.environ if environ is None else environ
    raw = env.get(CONFIG_ENV)
    with _judge_lock:
        if _judge is None or raw != _judge_source:
            config = JudgeConfig.from_env(env)
            if _judge is not None:
                _judge.close()
            _judge = Judge(config, environ=environ)
            _judge_source = raw
        return _judge


def _optional(columns: Mapping[str, Any], name: str, n: int) -> Sequence[Any]:
    values = columns.get(name)
    if isinstance(values, list | tuple) and len(values) == n:
        return values
    return [None] * n


def teacher_judge(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Teacher judge: the judge's 0..1 rubric score x 5.0 (= rewards.CORRECT, the rule rewards' scale).

    Needs the `answers` column (the round's gold label); uses `conversation_stage`, `messages` (the call
    and question) and `reference` or `reason` (a reference rationale) when present. Configured by
    TELEGUARD_JUDGE_CONFIG (JudgeConfig JSON), key in the variable it names. A sample the judge cannot score
    gets `fallback_reward` x 5.0 (2.5 by default). Mix with a rule reward through ms-swift's
    `--reward_funcs adaptive_classification teacher_judge --reward_weights 0.6 0.4` (see `mix_rewards`).
    """
    from teleguard.rewards import CORRECT, _column

    if CORRECT != TEACHER_SCALE:
        raise RuntimeError("teleguard.rewards.CORRECT changed; update judge.TEACHER_SCALE to match")
    n = len(completions)
    answers = _column(columns, "answers", n, "teacher_judge")
    stages = _optional(columns, "conversation_stage", n)
    contexts = _optional(columns, "messages", n)
    references = _optional(columns, "reference" if columns.get("reference") is not None else "reason", n)
    items = [
        JudgeItem(completion=c, gold=g, stage=s, reference=r, context=m)
        for c, g, s, r, m in zip(completions, answers, stages, references, contexts, strict=True)
    ]
    return [TEACHER_SCALE * j.reward for j in get_judge().judge(items)]


def mix_rewards(
    rule: Sequence[float], teacher: Sequence[float], rule_weight: float = 0.6, teacher_weight: float = 0.4
) -> list[float]:
    """rule_weight x rule + teacher_weight x teacher, per sample: what ms-swift computes for `--reward_weights`.

    Both inputs on the rule rewards' scale (teacher_judge already is), so the weights mean what they say.
    """
    if len(rule) != len(teacher):
        raise ValueError(f"{len(rule)} rule rewards for {len(teacher)} teacher rewards")
    return [rule_weight * r + teacher_weight * t for r, t in zip(rule, teacher, strict=True)]


# ---------------------------------------------------------------------------------- a local judge server


@contextlib.contextmanager
def local_judge_server(
    model_dir: str | os.PathLike[str],
    model_type: str,
    template: str,
    port: int | None = None,
    *,
    served_model_name: str = "judge",
    torch_dtype: str = "float32",
    startup_timeout_s: float = 300.0,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run `swift deploy` on 127.0.0.1 and yield its OpenAI-compatible base URL (`http://127.0.0.1:PORT/v1`).

    The command (ms-swift 4.6): `swift deploy --model DIR --model_type T --template TPL --infer_backend
    transformers --host 127.0.0.1 --port P --torch_dtype float32 --served_model_name judge --log_interval -1
    --verbose false`, offline. (4.6 names the backend `transformers`; `pt` is a deprecated alias. Deploy has no
    `--check_model`; it binds exactly the port given when it is free, else the next free one, so a free port
    is picked here first.) Requests name the model `served_model_name`. The server answers `logprobs` with
    `top_logprobs` (up to its `--max_logprobs`, 20) on CPU too; with a qwen3 template the answer content
    starts with the empty `<think>\\n\\n</think>\\n\\n` prefix, which the judge skips.

    Waits until GET /v1/models answers, then yields; on exit stops the server's process group (SIGTERM, then
    SIGKILL after 10 s). Measured start with the 2-layer tiny test model on a 2-core CPU machine: 8-13 s to
    the first /v1/models answer (mostly importing torch/transformers/ms-swift); a real 7B model adds its
    loading time. The server's output goes to `log_path` (default: a temp file, named in errors).
    """
    import httpx

    from teleguard.train.swift import swift_env

    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="teleguard-judge-server-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    else:
        log_file = Path(log_path)
        log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "swift.cli.main",
        "deploy",
        "--model",
        str(model_dir),
        "--model_type",
        model_type,
        "--template",
        template,
        "--infer_backend",
        "transformers",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--torch_dtype",
        torch_dtype,
        "--served_model_name",
        served_model_name,
        "--log_interval",
        "-1",
        "--verbose",
        "false",
        *extra_args,
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with log_file.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=swift_env(), start_new_session=True
        )
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"swift deploy exited with {proc.returncode} before serving (log: {log_file}):\n"
                        + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
                    )
                with contextlib.suppress(httpx.HTTPError):
                    models = client.get(f"{base_url}/models")
                    if models.status_code == 200 and any(
                        m.get("id") == served_model_name for m in models.json().get("data", [])
                    ):
                        break
                if time.monotonic() - started > startup_timeout_s:
                    raise TimeoutError(
                        f"swift deploy did not serve {base_url} within {startup_timeout_s:g} s (log: {log_file})"
                    )
                time.sleep(0.2)
        log.info("judge server %s up in %.1f s (log: %s)", base_url, time.monotonic() - started, log_file)
        yield base_url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
