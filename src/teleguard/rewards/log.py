"""The reward log: per-sample reward details, append-only JSON lines, written only when asked for.

On with `enable_reward_log(dir)` or the TELEGUARD_REWARD_LOG_DIR variable (read when teleguard.rewards is
first imported, so an ms-swift trainer subprocess logs when its parent sets it). Every reward calls `record`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from teleguard.contract.parser import ParsedOutput


class RewardLog:
    """Append-only JSON-lines log of reward details, one file per process rank.

    Appending keeps the cost of a call the same at the millionth call as at the first, and one writer per
    rank means concurrent ranks never write the same file.
    """

    def __init__(self, directory: Path) -> None:
        rank = os.environ.get("RANK", "0")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rewards-rank{rank}.jsonl"
        self._file: IO[str] = self.path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def write(self, reward: str, rows: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps({"reward": reward, **row}, ensure_ascii=False) + "\n" for row in rows)
        with self._lock:
            self._file.write(lines)

    def close(self) -> None:
        self._file.close()


_log: RewardLog | None = None
LOG_DIR_ENV = "TELEGUARD_REWARD_LOG_DIR"


def enable_reward_log(directory: str | Path | None) -> RewardLog | None:
    """Turn the reward log on (a directory) or off (None). Also on when TELEGUARD_REWARD_LOG_DIR is set."""
    global _log
    if _log is not None:
        _log.close()
    _log = RewardLog(Path(directory)) if directory else None
    return _log


if os.environ.get(LOG_DIR_ENV):
    enable_reward_log(os.environ[LOG_DIR_ENV])


def record(name: str, parsed: list[ParsedOutput], values: list[float], **columns: Sequence[Any]) -> None:
    """Log one batch of reward `name` (a row per sample, with `columns`' values) when the log is on."""
    if _log is None:
        return
    rows = [
        {
            "value": value,
            **{key: col[i] for key, col in columns.items()},
            "problems": list(p.problems),
            "think_length": p.think_length,
        }
        for i, (p, value) in enumerate(zip(parsed, values, strict=True))
    ]
    _log.write(name, rows)
