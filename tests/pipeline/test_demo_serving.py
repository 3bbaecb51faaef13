"""The main job's serving demo (`teleguard.pipeline.demo_serving`) on a tiny model and four hand-written calls.

A run folder is laid out as KFP's local runner leaves it (the export step's model, the build-data step's
held-out calls) with nothing registered, as after a failed quality gate: the demo says it serves the exported
model, starts `teleguard serve` as a subprocess on a free loopback port, streams the calls, prints the
decisions, the verdicts and the /metrics counters, and stops the server with SIGTERM.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from teleguard.data.dataset import write_calls
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.pipeline.demo_serving import DEMO_DIR, demo_from_run, pick_calls
from teleguard.tiny_models import TinyModel
from tests.support.detector import TURNS


def calls() -> list[CallRecord]:
    out = []
    for i, fraud in enumerate((True, False, True, False, False)):
        out.append(
            CallRecord(
                call_id=f"test/{'fraud' if fraud else 'normal'}-{i}",
                source="test",
                turns=tuple(Turn(speaker=s, text=t) for s, t in TURNS),
                labels=CallLabels(is_fraud=fraud),
            )
        )
    return out


def test_demo_serves_the_exported_model_and_replays_held_out_calls(
    tiny_text_model: TinyModel, tmp_path: Path
) -> None:
    chosen = pick_calls(calls())
    assert [c.call_id for c in chosen] == ["test/fraud-0", "test/fraud-2", "test/normal-1", "test/normal-3"]

    run = tmp_path / "run"
    (run / "export-model").mkdir(parents=True)
    (run / "export-model" / "model").symlink_to(tiny_text_model.path)
    write_calls(run / "build-data" / "calls" / "test", calls())
    out = io.StringIO()
    console = Console(file=out, width=120)
    summary = demo_from_run({"run": str(run), "registered": None}, console=console)
    printed = out.getvalue()

    assert summary is not None
    assert "serving the export step's model instead" in printed
    assert "live decisions on held-out calls" in printed and "fraud rate" in printed
    assert [c["call_id"] for c in summary["calls"]] == [c.call_id for c in chosen]
    # every call completed on the server, every turn was a chunk, and the server drained and stopped on SIGTERM
    metrics = summary["metrics"]
    assert sum(v for k, v in metrics.items() if k.startswith("calls_completed{")) == 4
    assert metrics["teleguard_chunks_total"] == 4 * len(TURNS)
    assert all(c["verdict"]["chunks"] == len(TURNS) for c in summary["calls"])
    assert summary["server_exit_code"] in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert (run / DEMO_DIR / "server.log").is_file()
    assert json.loads((run / DEMO_DIR / "serve-demo.json").read_text("utf-8"))["url"] == summary["url"]

    # nothing to serve: the demo is skipped, saying why
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo_from_run({"run": str(empty), "registered": None}, console=console) is None
    assert "skipping the serving demo" in out.getvalue()
