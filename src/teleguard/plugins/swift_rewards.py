"""ms-swift 4 plugin: registers every teleguard reward in `swift.rewards.orms`.

Use: `swift rlhf --rlhf_type grpo --external_plugins <this file> --reward_funcs prompt_format adaptive_classification`.
ms-swift instantiates `orms[name](args=...)` and calls the instance as `fn(completions, **columns)`, so each
reward is wrapped in a small ORM class named after the reward (the name ms-swift logs it under).
"""

from __future__ import annotations

from typing import Any

from swift.rewards import ORM, orms

from teleguard.rewards import REWARDS, RewardFn


def _orm_class(name: str, fn: RewardFn) -> type[ORM]:
    def __call__(self: ORM, completions: list[Any], **columns: Any) -> list[float]:
        return fn(completions, **columns)

    return type(name, (ORM,), {"__call__": __call__, "__doc__": fn.__doc__})


def register() -> list[str]:
    """Put every reward into ms-swift's registry (idempotent) and return the names."""
    for name, fn in REWARDS.items():
        orms[name] = _orm_class(name, fn)
    return list(REWARDS)


register()
