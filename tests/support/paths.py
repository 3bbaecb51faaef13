"""Where the tests find the repository and the shared folder beside it."""

from __future__ import annotations

import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The `shared/` folder beside the repository (data, schemas, seeds); absent on a bare checkout.
SHARED_DIR = REPO.parent / "shared"
TRANSCRIPTS_DIR = SHARED_DIR / "data" / "teleantifraud-dialogues"
RECIPES = REPO / "recipes"


def sample_transcripts(dest: Path, per_file: int) -> Path:
    """`dest` holding the first `per_file` calls of every shared transcript file (same file names), for tests
    whose point is not the size of the data."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in sorted(TRANSCRIPTS_DIR.glob("*.jsonl")):
        with source.open(encoding="utf-8") as lines:
            (dest / source.name).write_text("".join(itertools.islice(lines, per_file)), "utf-8")
    return dest
