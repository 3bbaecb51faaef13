"""The teacher judge's configuration: where the judge is, how to talk to it, and the rubric's weights."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teleguard.rewards.judge.cache import STATS_DIR

CONFIG_ENV = "TELEGUARD_JUDGE_CONFIG"
API_KEY_ENV = "TELEGUARD_JUDGE_API_KEY"

Criterion = Literal["logical_rigour", "practical_value", "expression_quality"]
CRITERIA: tuple[Criterion, ...] = ("logical_rigour", "practical_value", "expression_quality")


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
