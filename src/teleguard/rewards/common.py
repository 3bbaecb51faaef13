"""What the rewards share: the function type, the rule rewards' scale, and the dataset-column check.

Dataset columns arrive as lists aligned with `completions` (ms-swift and TRL pass every extra dataset column
that way); `column` hands one over, or raises an error that names it when it is missing or has the wrong length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[..., list[float]]

CORRECT = 5.0  # the right label, or a null label where the call is still in its early stage
INVALID = -3.0  # a label outside the closed set (or a non-boolean is_fraud), or an impossible stage answer
WRONG = 0.0  # a wrong but valid label, no answer, or an unparsable answer


def column(columns: dict[str, Any], name: str, n: int, reward: str) -> Sequence[Any]:
    """The dataset column `name`, one value per completion; ValueError naming it and `reward` otherwise."""
    if name not in columns or columns[name] is None:
        raise ValueError(
            f"reward {reward!r} needs the dataset column {name!r}, which is missing "
            f"(columns given: {sorted(k for k in columns if not k.startswith('_'))})"
        )
    values = columns[name]
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"reward {reward!r}: column {name!r} must be a list with one value per completion")
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return values
