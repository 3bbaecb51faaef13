"""What the steps share: copying artifact folders and the recipe with a step's folders."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from teleguard.train.config import Recipe, load_recipe


def copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, dirs_exist_ok=True)


def step_recipe(recipe: str, overrides: dict[str, Any], **paths: str | None) -> Recipe:
    """The recipe with the step's folders (model path, datasets, output_dir) and the user's overrides."""
    where = {"model_path": "model.path", "datasets": "data.datasets", "output_dir": "output_dir"}
    return load_recipe(recipe, {**overrides, **{where[k]: v for k, v in paths.items() if v}})
