"""The quality gate's checks and the registration of the serving model."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from teleguard.pipeline.steps.common import copy_tree

GATE_FIGURES = (  # (pipeline parameter, figure, at least / at most)
    ("min_live_accuracy", "live_verdict_accuracy", "min"),
    ("max_false_alarm_rate", "live_false_alarm_rate", "max"),
    ("min_live_fraud_type_accuracy", "live_fraud_type_accuracy", "min"),
    ("min_flagged_within_half", "live_flagged_within_half", "min"),
    ("min_well_formed", "well_formed_rate", "min"),
)


def gate_checks(result: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Each threshold against the evaluated figure (live figures: the deployed detector on held-out calls).
    A figure the evaluation did not produce fails its check."""
    figures = {**result.get("live", {}), "well_formed_rate": result.get("well_formed_rate")}
    checks = []
    for parameter, figure, kind in GATE_FIGURES:
        limit = thresholds[parameter]
        value = figures.get(figure)
        ok = value is not None and (value >= limit if kind == "min" else value <= limit)
        checks.append(
            {
                "parameter": parameter,
                "figure": figure,
                "value": value,
                "limit": limit,
                "kind": kind,
                "passed": ok,
            }
        )
    return checks


def register_step(model: Path, registry_uri: str, name: str, metrics: dict[str, Any]) -> str:
    """Put the serving model under `<registry_uri>/<name>/<version>` (local folder or S3, with checksums)."""
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = f"{registry_uri.rstrip('/')}/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="teleguard-register-") as tmp:
        staged = Path(tmp) / "model"
        copy_tree(model, staged)
        (staged / "teleguard-model-card.json").write_text(
            json.dumps({"name": name, "version": version, "metrics": metrics}, indent=2, default=str), "utf-8"
        )
        if "://" in registry_uri:
            from teleguard.storage import put_dir

            put_dir(staged, target)
        else:
            copy_tree(staged, Path(target))
    return target
