"""Reading user-written YAML files (recipes, prompt files) with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_mapping(path: Path, what: str, error: type[ValueError]) -> dict[str, Any]:
    """The file's top-level mapping; `error` names the file and what is wrong with it."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} is a mapping of sections, got {type(raw).__name__}")
    return raw


def field_errors(err: ValidationError) -> list[str]:
    """One "field 'a.b': what is wrong" line per pydantic error."""
    return [
        f"field '{'.'.join(str(p) for p in e['loc']) or '(top level)'}': {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors(include_url=False)
    ]
