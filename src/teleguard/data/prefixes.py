"""Streaming prefixes of a call for the real-time stage, labelled with their conversation stage.

A prefix is the call cut at a turn boundary. Its stage follows SAFE-QAQ's meaning, measured in call-audio time:

- `complete`: the whole call;
- `early_stage`: the prefix covers at most `early_until` (default 40 %) of the call's duration: the caller's
  intent is usually not shown yet, so a null label is acceptable;
- `late_stage`: any other proper prefix: the call is past its middle and heading to its end, so a label
  should be given.

Prefixes shorter than `min_turns` turns are not cut (default 1: the caller's opening, the earliest point a
detector can be asked at, and often where a fraud call shows itself). `per_stage` boundaries are
drawn for each of early and late (all of them with per_stage=None), with a random generator seeded by the
call id, so the same call always yields the same prefixes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from teleguard.contract import Stage
from teleguard.data.records import CallRecord
from teleguard.data.timing import SpeechRate, estimate_times


class PrefixPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    early_until: float = Field(default=0.4, gt=0, lt=1)
    min_turns: int = Field(default=1, ge=1)
    per_stage: int | None = Field(default=1, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class Prefix:
    """The first `turns` turns of a call, ending at `end_s` seconds of call audio."""

    call: CallRecord  # the prefix's own record: the cut turns, the parent's labels and audio
    parent_id: str
    stage: Stage
    turns: int
    end_s: float

    @property
    def prefix_id(self) -> str:
        return f"{self.parent_id}@{self.turns}"


def stage_of(end_s: float, duration: float, early_until: float) -> Stage:
    """The stage of a proper prefix that ends at `end_s` of a call lasting `duration` seconds."""
    return Stage.EARLY if end_s <= early_until * duration else Stage.LATE


def cut_prefixes(
    record: CallRecord, policy: PrefixPolicy | None = None, rate: SpeechRate | None = None
) -> list[Prefix]:
    """The call's prefixes (timing the turns first if needed), in order, the complete call last."""
    policy = policy or PrefixPolicy()
    if not record.turns:
        raise ValueError(f"call {record.call_id}: prefixes need turns (it has audio only)")
    timed = estimate_times(record, rate)
    duration = timed.duration or 0.0
    n = len(timed.turns)
    by_stage: dict[Stage, list[int]] = {Stage.EARLY: [], Stage.LATE: []}
    for k in range(policy.min_turns, n):
        by_stage[stage_of(timed.turns[k - 1].end or 0.0, duration, policy.early_until)].append(k)
    chosen: list[tuple[int, Stage]] = []
    rng = random.Random(f"{policy.seed}:{record.call_id}")
    for stage, ks in by_stage.items():
        if policy.per_stage is not None and len(ks) > policy.per_stage:
            ks = sorted(rng.sample(ks, policy.per_stage))
        chosen += [(k, stage) for k in ks]
    chosen.append((n, Stage.COMPLETE))
    return [
        Prefix(
            call=timed if k == n else timed.model_copy(update={"turns": timed.turns[:k]}),
            parent_id=timed.call_id,
            stage=stage,
            turns=k,
            end_s=timed.turns[k - 1].end or 0.0,
        )
        for k, stage in chosen
    ]
