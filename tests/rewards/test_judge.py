"""The teacher judge against a REAL OpenAI-compatible server: `swift deploy` serving the tiny test model,
behind a counting proxy (tests/support/judge_proxy.py) that can delay requests or answer errors.

The tiny model's random weights never put "1".."5" among their top log-probabilities, so the fixture derives
a "judge" copy of `tiny_text_model` whose output head favours the five score tokens (input-dependent, so
scores vary between completions); everything else (tokenizer, template, server, logprobs) is the real thing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teleguard.rewards import CORRECT, REWARDS
from teleguard.rewards.judge import (
    API_KEY_ENV,
    CONFIG_ENV,
    CRITERIA,
    Judge,
    JudgeConfig,
    JudgeItem,
    JudgementCache,
    RateLimiter,
    local_judge_server,
    mix_rewards,
    read_stats,
    score_from_logprobs,
    score_from_text,
)
from teleguard.rewards.judge import reward as judge_reward
from teleguard.tiny_models import TinyModel
from tests.support.judge_proxy import CountingProxy

SECRET = "sk-test-NEVER-LOG-4f9c2e"


def answer(is_fraud: bool, think: str) -> str:
    obj = {"is_fraud": is_fraud, "conversation_stage": "complete", "confidence": 0.9, "reason": think[:20]}
    return f"<think>{think}</think><answer>{json.dumps(obj, ensure_ascii=False)}</answer>"


GOOD = answer(True, "对方冒充银行客服，索要验证码并要求转账到安全账户，这是典型的冒充客服诈骗。")
WEAK = answer(False, "听起来还行。")
CALL = [
    {"role": "user", "content": "通话：您好，我是银行客服，您的账户异常，请提供验证码。\n这通电话是诈骗吗？"}
]


def items(*completions: str) -> list[JudgeItem]:
    return [JudgeItem(completion=c, gold="fraud", stage="complete", context=CALL) for c in completions]


# --------------------------------------------------------------------------------------- pure functions


def test_score_from_logprobs_is_the_expected_value_over_score_tokens() -> None:
    entries = [
        {
            "token": "4",
            "logprob": -0.5,
            "top_logprobs": [
                {"token": "4", "logprob": -0.5},
                {"token": "的", "logprob": -1.0},
                {"token": "2", "logprob": -1.5},
            ],
        }
    ]
    score, probs = score_from_logprobs(entries)
    import math

    p4, p2 = math.exp(-0.5), math.exp(-1.5)
    assert score == pytest.approx((4 * p4 + 2 * p2) / (p4 + p2))
    assert set(probs) == {2, 4}
    # The score position is found after a think prefix; no score token anywhere -> None.
    assert (
        score_from_logprobs([{"token": "<think>", "logprob": 0.0, "top_logprobs": []}, *entries])[0] == score
    )
    assert score_from_logprobs([{"token": "好", "logprob": 0.0, "top_logprobs": []}]) is None
    assert score_from_logprobs(None) is None


def test_score_from_text_skips_think_and_larger_numbers() -> None:
    assert score_from_text("<think>\n\n</think>\n\n4") == 4
    assert score_from_text("<think>maybe 2</think> score: 5") == 5
    assert score_from_text("10 or 3.5 then 3") == 3
    assert score_from_text("４") == 4
    assert score_from_text("专业") is None


def test_config_round_trips_through_the_environment_and_holds_no_key() -> None:
    config = JudgeConfig(base_url="https://api.deepseek.com/v1/", model="deepseek-chat", rate_limit_per_s=5)
    env = config.to_env()
    assert set(env) == {CONFIG_ENV}
    assert JudgeConfig.from_env(env) == config
    assert config.base_url == "https://api.deepseek.com/v1" and config.api_key_env == API_KEY_ENV
    with pytest.raises(ValueError, match=CONFIG_ENV):
        JudgeConfig.from_env({})
    with pytest.raises(ValueError):
        JudgeConfig(base_url="http://x/v1", model="m", api_key="sk-...")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        JudgeConfig(base_url="http://x/v1", model="m", api_key_env="sk-abc def")


def test_rate_limiter_spaces_acquisitions_across_threads() -> None:
    import threading

    limiter, n, rate = RateLimiter(50.0), 6, 50.0
    started = time.monotonic()
    threads = [threading.Thread(target=limiter.acquire) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= (n - 1) / rate - 0.01


# -------------------------------------------------------------------------------------- the real server


def _judge_model(tiny: TinyModel, out: Path) -> Path:
    """A copy of the tiny model whose first generated token is one of "1".."5" (varying with the input)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(tiny.path, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 0] += 0.2  # hidden dim 0 positive for every input...
    head = weights["lm_head.weight"]
    head[ids, 1:] *= 10.0  # ...the score tokens' other dims amplified (input-dependent preferences)...
    head[ids, 0] = 3.0  # ...and dim 0 lifts the score tokens above the rest of the vocabulary
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def judge_server(tiny_text_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = _judge_model(tiny_text_model, tmp_path_factory.mktemp("judge") / "model")
    started = time.monotonic()
    with local_judge_server(
        folder, tiny_text_model.model_type, tiny_text_model.template, log_path=folder.parent / "deploy.log"
    ) as base_url:
        logging.getLogger(__name__).info("swift deploy up in %.1f s", time.monotonic() - started)
        yield base_url


@pytest.fixture(scope="module")
def proxy(judge_server: str) -> Iterator[CountingProxy]:
    proxy = CountingProxy(judge_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fresh_proxy(proxy: CountingProxy) -> CountingProxy:
    proxy.reset()
    return proxy


def config(proxy: CountingProxy, cache: Path | None = None, **overrides: object) -> JudgeConfig:
    options: dict[str, object] = {
        "base_url": f"{proxy.url}/v1",
        "model": "judge",
        "timeout_s": 20.0,
        "max_retries": 2,
        "backoff_s": 0.05,
        "max_concurrency": 3,
        "cache": str(cache) if cache else None,
    }
    options.update(overrides)
    return JudgeConfig.model_validate(options)


def test_scores_are_in_range_and_reproducible(fresh_proxy: CountingProxy) -> None:
    with Judge(config(fresh_proxy)) as judge:
        first = judge.judge(items(GOOD, WEAK))
        second = judge.judge(items(GOOD, WEAK))
    assert fresh_proxy.forwarded == 2 * 2 * len(CRITERIA)  # no cache: every batch asks again
    for j in first:
        assert not j.fallback and 0.0 <= j.reward <= 1.0
        assert set(j.scores) == set(CRITERIA) and all(1.0 <= s <= 5.0 for s in j.scores.values())
        assert set(j.sources.values()) == {"logprobs"}  # the expected value, not a parsed integer
    assert [j.reward for j in second] == pytest.approx([j.reward for j in first], abs=1e-6)
    assert first[0].reward != pytest.approx(first[1].reward, abs=1e-9)  # the judge looks at the completion
    body = json.loads(fresh_proxy.chat_requests()[0].body)
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1


def test_the_cache_prevents_repeated_calls(fresh_proxy: CountingProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with Judge(config(fresh_proxy, cache)) as judge:
        first = judge.judge(items(GOOD, WEAK, GOOD))  # the duplicate is judged once
    assert fresh_proxy.forwarded == 2 * len(CRITERIA)
    assert len(JudgementCache(str(cache))) == 2

    fresh_proxy.reset()
    with Judge(config(fresh_proxy, cache)) as judge:  # a rerun: a new process, the same cache
        again = judge.judge(items(GOOD, WEAK, GOOD))
        assert fresh_proxy.forwarded == 0
        assert [j.reward for j in again] == pytest.approx([j.reward for j in first])
        assert all(j.cached for j in again)
        assert judge.stats.snapshot()["cache_hits"] == 3

        other = judge.judge(items(GOOD, answer(True, "索要验证码，是诈骗。")))
    assert fresh_proxy.forwarded == len(CRITERIA)  # only the new completion
    assert other[0].cached and not other[1].cached
    totals = read_stats(str(cache / "stats"))
    assert totals["cache_hits"] == 4 and totals["calls"] == 3 and totals["fallbacks"] == 0


def test_a_timeout_gets_the_fallback_and_is_not_cached(fresh_proxy: CountingProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    slow = answer(True, "SLOW-MARKER 慢慢想")
    fresh_proxy.add_rule(match=b"SLOW-MARKER", times=None, delay_s=1.5)
    cfg = config(fresh_proxy, cache, timeout_s=0.4, max_retries=1, fallback_reward=0.5)
    started = time.monotonic()
    with Judge(cfg) as judge:
        result = judge.judge(items(GOOD, slow))
        counters = judge.stats.snapshot()
    assert time.monotonic() - started < 5
    assert not result[0].fallback
    assert result[1].fallback and result[1].reward == 0.5 and "no answer within" in (result[1].error or "")
    assert counters["fallbacks"] == 1 and counters["fallback_timeout"] == 1
    assert counters["timeouts"] == 2 * len(CRITERIA)  # every criterion, first try and retry
    assert counters["retries"] == len(CRITERIA)
    assert len(JudgementCache(str(cache))) == 1  # only the good one
    assert read_stats(str(cache / "stats"))["fallbacks"] == 1

    fresh_proxy.reset()  # the judge is healthy again: a rerun asks for the failed sample only
    with Judge(cfg) as judge:
        rerun = judge.judge(items(GOOD, slow))
    assert not rerun[1].fallback and rerun[0].cached
    assert fresh_proxy.forwarded == len(CRITERIA)


def test_a_503_is_retried_with_backoff_and_a_400_is_not(fresh_proxy: CountingProxy) -> None:
    fresh_proxy.add_rule(match=b"RETRY-MARKER", times=1, status=503, retry_after="1")
    with Judge(config(fresh_proxy, max_concurrency=1)) as judge:
        started = time.monotonic()
        [ok] = judge.judge(items(answer(True, "RETRY-MARKER 冒充客服")))
        elapsed = time.monotonic() - started
        counters = judge.stats.snapshot()
    assert not ok.fallback
    assert (
        counters["calls"] == len(CRITERIA) + 1 and counters["retries"] == 1 and counters["http_errors"] == 1
    )
    assert elapsed >= 1.0  # Retry-After: 1 was respected
    assert fresh_proxy.forwarded == len(CRITERIA)

    fresh_proxy.reset()
    fresh_proxy.add_rule(match=b"BAD-MARKER", times=1, status=400)
    with Judge(config(fresh_proxy)) as judge:
        [bad] = judge.judge(items(answer(True, "BAD-MARKER")))
        counters = judge.stats.snapshot()
    assert bad.fallback and bad.reward == 0.5 and "HTTP 400" in (bad.error or "")
    assert counters["retries"] == 0 and counters["fallback_http"] == 1


def test_the_api_key_is_sent_as_bearer_and_never_logged_or_cached(
    fresh_proxy: CountingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    cache = tmp_path / "cache"
    # A server that echoes the Authorization header in its error body (some do) must not leak it either.
    fresh_proxy.add_rule(match=b"ECHO-MARKER", times=None, status=401, echo_authorization=True)
    fresh_proxy.add_rule(match=b"RETRY-MARKER", times=1, status=503)
    cfg = config(fresh_proxy, cache)
    caplog.set_level(logging.DEBUG)
    with Judge(cfg) as judge:
        results = judge.judge(items(GOOD, answer(True, "ECHO-MARKER"), answer(True, "RETRY-MARKER")))
    assert not results[0].fallback and results[1].fallback and not results[2].fallback
    auth = {r.headers.get("authorization") for r in fresh_proxy.chat_requests(forwarded_only=False)}
    assert auth == {f"Bearer {SECRET}"}
    assert "judge: fallback" in caplog.text and "HTTP 401" in caplog.text
    assert SECRET not in caplog.text and SECRET not in (results[1].error or "")
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any("stats" in p.parts for p in files) and any("judgements" in p.parts for p in files)
    assert not [p for p in files if SECRET in p.read_text(encoding="utf-8")]
    assert SECRET not in cfg.model_dump_json() and SECRET not in json.dumps(cfg.to_env())


def test_the_rate_limit_spaces_calls(fresh_proxy: CountingProxy) -> None:
    rate, n = 20.0, 2 * len(CRITERIA)
    started = time.monotonic()
    with Judge(config(fresh_proxy, rate_limit_per_s=rate, max_concurrency=4)) as judge:
        judge.judge(items(GOOD, WEAK))
    assert fresh_proxy.forwarded == n
    assert time.monotonic() - started >= (n - 1) / rate
    sent = sorted(r.at for r in fresh_proxy.chat_requests())
    assert sent[-1] - sent[0] >= (n - 1) / rate - 0.02


def test_the_reward_through_rewards_mixes_with_the_rule_reward(
    fresh_proxy: CountingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(fresh_proxy, tmp_path / "cache")
    for name, value in cfg.to_env().items():
        monkeypatch.setenv(name, value)
    completions = [GOOD, WEAK]
    columns = {
        "answers": ["fraud", "fraud"],
        "conversation_stage": ["complete", "complete"],
        # ms-swift passes the messages with the completion appended; the judge drops it from the context
        "messages": [[*CALL, {"role": "assistant", "content": c}] for c in completions],
        "call_id": ["c1", "c2"],
        "trainer_state": None,
    }
    try:
        teacher = REWARDS["teacher_judge"](completions, **columns)
        with Judge(cfg) as judge:  # the same judgements, straight from the cache
            direct = judge.judge(items(*completions))
        assert teacher == pytest.approx([CORRECT * j.reward for j in direct])
        assert all(0.0 <= t <= CORRECT for t in teacher)
        assert fresh_proxy.forwarded == 2 * len(CRITERIA)

        rule = REWARDS["fraud_classification"](completions, **columns)
        assert rule == [CORRECT, 0.0]
        mixed = mix_rewards(rule, teacher)
        assert mixed == pytest.approx([0.6 * r + 0.4 * t for r, t in zip(rule, teacher, strict=True)])
        with pytest.raises(ValueError, match="answers"):
            REWARDS["teacher_judge"](completions, conversation_stage=["complete"] * 2)
    finally:
        if judge_reward._judge is not None:
            judge_reward._judge.close()
            judge_reward._judge = None


def test_an_s3_cache_serves_a_rerun(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "S3_ENDPOINT": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    uri = "s3://judge-cache/run-1"
    cache = JudgementCache(uri)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, {"scores": {c: 4.0 for c in CRITERIA}})
    again = JudgementCache(uri)  # a new process lists what is there
    assert len(again) == 1 and again.get("ab" * 32) == {"scores": {c: 4.0 for c in CRITERIA}}
