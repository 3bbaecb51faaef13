"""Validating custom resources offline against the CRD schemas in ../shared/schemas/crds.

The API server prunes or rejects fields a CRD's schema does not declare; here they are errors, so a misspelt
field fails a test instead of silently vanishing on a cluster. Subtrees marked
x-kubernetes-preserve-unknown-fields (or typed as free-form objects) keep accepting anything.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.paths import SHARED_DIR

CRDS_DIR = SHARED_DIR / "schemas" / "crds"


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for child in schema.get("properties", {}).values():
        _strict(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key, []):
            _strict(child)
    return schema


def crd_validator(crd_file: str, version: str) -> jsonschema.Draft202012Validator:
    """A validator for one version of the CRD in `crd_file` (a file name in the shared CRD folder)."""
    if not CRDS_DIR.is_dir():
        pytest.skip("the shared CRD schemas are not beside this checkout (../shared/schemas)")
    crd = yaml.safe_load((CRDS_DIR / crd_file).read_text("utf-8"))
    [schema] = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(copy.deepcopy(schema))
    # metadata is the API server's ObjectMeta, which CRD schemas leave open
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def crd_errors(doc: dict[str, Any], crd_file: str) -> list[str]:
    version = doc["apiVersion"].split("/")[1]
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(crd_file, version).iter_errors(doc)
    ]
