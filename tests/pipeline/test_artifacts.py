"""The one adapter between components and step functions (teleguard.pipeline.artifacts): artifacts in as folders,
metrics out as JSON, and a GRPO-type stage on several nodes as a TrainJob on the artifacts' URIs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from teleguard.pipeline import artifacts
from teleguard.pipeline.steps import training


@dataclass
class FakeArtifact:
    path: str
    uri: str


def artifact(tmp_path: Path, name: str) -> FakeArtifact:
    return FakeArtifact(str(tmp_path / name), f"s3://bucket/run/{name}")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    seen: list[tuple[str, tuple, dict]] = []

    def fake(name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> dict[str, Any]:
            seen.append((name, args, kwargs))
            return {"loss": 0.5, "where": Path("/x")}

        return record

    monkeypatch.setattr(training, "train_stage_step", fake("pod"))
    monkeypatch.setattr(training, "trainjob_stage_step", fake("trainjob"))
    monkeypatch.setattr("teleguard.train.trainjob.current_namespace", lambda: "ns")
    return seen


def test_a_stage_gets_folders_and_returns_json(tmp_path: Path, calls: list) -> None:
    d, s, m, sel, rm = (artifact(tmp_path, n) for n in ("datasets", "start", "model", "selection", "rm"))
    out = artifacts.stage_step(
        "rsft", True, "r.yaml", {"a": 1}, d, s, m, selection=sel, side_models={"rm": rm}
    )
    assert json.loads(out) == {"loss": 0.5, "where": "/x"}  # default=str: paths come out as strings
    [(where, args, kwargs)] = calls
    assert where == "pod"
    assert args == (
        "rsft",
        True,
        "r.yaml",
        {"a": 1},
        tmp_path / "datasets",
        tmp_path / "start",
        tmp_path / "model",
    )
    assert kwargs == {
        "selection": tmp_path / "selection",
        "inputs": {},
        "side_models": {"rm": tmp_path / "rm"},
    }


@pytest.mark.parametrize(
    ("enabled", "num_nodes", "where"), [(True, 1, "pod"), (False, 4, "pod"), (True, 2, "trainjob")]
)
def test_a_grpo_stage_on_several_nodes_is_a_trainjob(
    tmp_path: Path, calls: list, enabled: bool, num_nodes: int, where: str
) -> None:
    d, s, m = (artifact(tmp_path, n) for n in ("datasets", "start", "model"))
    nodes = artifacts.Nodes(num_nodes, "img:1", "nvidia.com/gpu", 8, {"pool": "gpu"}, [])
    artifacts.stage_step("lcrl", enabled, "r.yaml", {}, d, s, m, nodes=nodes)
    [(seen, _, kwargs)] = calls
    assert seen == where
    if where == "trainjob":
        assert (
            kwargs["datasets_uri"] == d.uri
            and kwargs["start_model_uri"] == s.uri
            and kwargs["output_uri"] == m.uri
        )
        assert kwargs["out_model"] == tmp_path / "model"
        settings = kwargs["settings"]
        assert (settings.namespace, settings.num_nodes, settings.gpus_per_node, settings.image) == (
            "ns",
            2,
            8,
            "img:1",
        )
