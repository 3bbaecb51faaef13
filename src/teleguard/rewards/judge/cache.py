"""Storage of the teacher judge's judgements and counters: a local folder or S3, through `teleguard.storage`.

Layout under the cache URI (a folder path, ``file://``, ``s3://`` or ``minio://``):

- ``judgements/<k[:2]>/<k>.json``: one small JSON object per judgement, named by its content hash ``k``
  (see `teleguard.rewards.judge.Judge.key`). Judgements are immutable, so concurrent writers (several ranks,
  several runs) never conflict: two writers of one key write the same content, and a local write is atomic
  (temp file + rename), an S3 write one PUT.
- ``stats/judge-stats-rank<R>-pid<P>.json``: each process's cumulative counters, rewritten after every batch.
  `read_stats` sums them, so a run's report can say how many samples got the fallback reward.

The local backend reads files directly, so it sees other ranks' judgements at once. The S3 backend lists the
existing keys once when it opens (one LIST per 1,000 judgements) and then fetches only keys it knows of, so a
miss costs no request; judgements that other processes write later are not seen until the next open.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from teleguard.storage import LocalStorage, Storage, StorageError

log = logging.getLogger(__name__)

JUDGEMENTS_DIR = "judgements"
STATS_DIR = "stats"


def _judgement_path(key: str) -> str:
    return f"{JUDGEMENTS_DIR}/{key[:2]}/{key}.json"


class JudgementCache:
    """Judgements by content hash. `get` returns None on a miss; errors surface as `StorageError`."""

    def __init__(self, uri: str, *, environ: Mapping[str, str] | None = None) -> None:
        self.storage = Storage.from_uri(uri, environ=environ)
        self.uri = self.storage.uri
        self.local = isinstance(self.storage, LocalStorage)
        self._known: set[str] = set()
        self._lock = threading.Lock()
        if not self.local:
            for rel in self.storage.list_files(JUDGEMENTS_DIR):
                name = rel.rsplit("/", 1)[-1]
                if name.endswith(".json"):
                    self._known.add(name[: -len(".json")])

    def __len__(self) -> int:
        if self.local:
            return len(self.storage.list_files(JUDGEMENTS_DIR))
        return len(self._known)

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.local:
            with self._lock:
                if key not in self._known:
                    return None
        try:
            data = self.storage.read_bytes(_judgement_path(key))
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            log.warning("judge cache: %s holds no JSON; judging again", _judgement_path(key))
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        data = json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self.storage.write_bytes(_judgement_path(key), data)
        if not self.local:
            with self._lock:
                self._known.add(key)


# ------------------------------------------------------------------------------------------------- stats


def stats_file_name() -> str:
    """This process's stats file: one per rank and process, so writers never share a file."""
    return f"judge-stats-rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.json"


def write_stats(stats_dir: str, stats: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> str:
    """Write `stats` as this process's stats file under `stats_dir` (a folder or URI); returns its URI."""
    storage = Storage.from_uri(stats_dir, environ=environ)
    name = stats_file_name()
    storage.write_bytes(name, json.dumps(dict(stats), indent=2, sort_keys=True).encode("utf-8"))
    return storage.uri_of(name)


def read_stats(stats_dir: str, *, environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The counters of every process that wrote under `stats_dir`, summed (numbers only); {} if none."""
    storage = Storage.from_uri(stats_dir, environ=environ)
    totals: dict[str, int] = {}
    try:
        names = storage.list_files()
    except (FileNotFoundError, StorageError):
        return totals
    for name in names:
        if not (name.startswith("judge-stats-") and name.endswith(".json")):
            continue
        try:
            stats = json.loads(storage.read_bytes(name))
        except (ValueError, FileNotFoundError):
            continue
        for field, value in (stats.get("counters") or {}).items():
            if isinstance(value, int):
                totals[field] = totals.get(field, 0) + value
    return totals
