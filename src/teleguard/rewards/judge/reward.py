"""The `teacher_judge` reward function: the process's Judge, built from TELEGUARD_JUDGE_CONFIG."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from teleguard.rewards.common import CORRECT, column
from teleguard.rewards.judge.batch import Judge
from teleguard.rewards.judge.config import CONFIG_ENV, JudgeConfig
from teleguard.rewards.judge.rubric import JudgeItem

TEACHER_SCALE = CORRECT  # the rule rewards' scale, so rule and teacher rewards mix as the weights say

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
    n = len(completions)
    answers = column(columns, "answers", n, "teacher_judge")
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
