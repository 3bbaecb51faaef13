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

**Cache** (`cache`): judgements are stored by a sha256 over the prompt version and the exact
request bodies (judge model, rubric prompts, call context, reference, completion, sampling parameters), so a
rerun over the same completions makes no request at all.

**Counters** (served from cache, calls, retries, timeouts, fallbacks...) are logged after every batch and
written to `<stats_dir>/judge-stats-rank<R>-pid<P>.json` (default `<cache>/stats`); `read_stats` sums them.

Modules, one per part: `config` (JudgeConfig, RubricWeights), `rubric` (the prompts), `scoring` (reading a
score), `client` (HTTP, retries, rate limit), `cache` (judgements and counters), `batch` (Judge), `reward`
(`teacher_judge`, `mix_rewards`) and `server` (`local_judge_server`, a `swift deploy` on loopback).
"""

from __future__ import annotations

from teleguard.rewards.judge.batch import Judge, Judgement
from teleguard.rewards.judge.cache import JudgementCache, read_stats
from teleguard.rewards.judge.client import JudgeError, RateLimiter
from teleguard.rewards.judge.config import API_KEY_ENV, CONFIG_ENV, CRITERIA, JudgeConfig, RubricWeights
from teleguard.rewards.judge.reward import TEACHER_SCALE, get_judge, mix_rewards, teacher_judge
from teleguard.rewards.judge.rubric import PROMPT_VERSION, JudgeItem
from teleguard.rewards.judge.scoring import score_from_logprobs, score_from_text
from teleguard.rewards.judge.server import local_judge_server

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
    "JudgementCache",
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
