"""Deterministic train/dev/test splits by call, stratified by label.

Splitting happens on whole calls, before prefixes are cut, so no prefix of a test call can reach training.
Within each label the call ids are sorted and shuffled with a generator seeded by (seed, label): the same
calls and seed always give the same split, whatever order the calls came in. Each split is then written in a
seeded order that mixes the labels.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from teleguard.data.records import CallRecord

SPLITS = ("train", "dev", "test")


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: float = Field(default=0.8, ge=0, le=1)
    dev: float = Field(default=0.1, ge=0, le=1)
    test: float = Field(default=0.1, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.dev + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must be 1, got {total:g}")
        return self


def split_calls(calls: list[CallRecord], spec: SplitSpec | None = None) -> dict[str, list[CallRecord]]:
    spec = spec or SplitSpec()
    by_label: dict[str, list[CallRecord]] = defaultdict(list)
    for call in calls:
        by_label[call.labels.name].append(call)
    out: dict[str, list[CallRecord]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda c: c.call_id)
        random.Random(f"{spec.seed}:{label}").shuffle(group)
        n_train = round(len(group) * spec.train)
        n_dev = round(len(group) * (spec.train + spec.dev)) - n_train
        out["train"] += group[:n_train]
        out["dev"] += group[n_train : n_train + n_dev]
        out["test"] += group[n_train + n_dev :]
    # A seeded order mixes the labels, so the first rows of any split file are no longer all one class
    # (stages and evaluations that read only the first N rows would otherwise see fraud calls alone).
    return {
        name: sorted(calls, key=lambda c: _order_key(spec.seed, c.call_id)) for name, calls in out.items()
    }


def _order_key(seed: int, call_id: str) -> str:
    return hashlib.sha256(f"{seed}:{call_id}".encode()).hexdigest()
