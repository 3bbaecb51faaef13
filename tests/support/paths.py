"""Where the tests find the repository and the shared folder beside it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The `shared/` folder beside the repository (data, schemas, seeds); absent on a bare checkout.
SHARED_DIR = REPO.parent / "shared"
TRANSCRIPTS_DIR = SHARED_DIR / "data" / "teleantifraud-dialogues"
RECIPES = REPO / "recipes"
