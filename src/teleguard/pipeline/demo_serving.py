"""The main job's last step: serve the model the pipeline trained and replay held-out calls through it, live.

`teleguard pipeline run --local` ends here (unless `--no-serve`): `teleguard serve` starts as a subprocess on a
free loopback port with the registered model (or, when the quality gate failed, the export step's model, and
it says so) and the prompts the model was trained with; once it is ready, a few held-out test calls (2 fraud,
2 normal by default, from the build-data step's `calls/test/calls.jsonl`) are streamed to it at once as
transcripts over the WebSocket, many times faster than real time, with `teleguard.serve.client`. Every decision
is printed as it arrives, then a table of the verdicts against the calls' labels and the server's fraud-rate
counters from /metrics; the server is stopped with SIGTERM (it drains) and its log is kept beside the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from teleguard.data.records import CallRecord
from teleguard.loopback import free_port
from teleguard.serve.client import ReplayEvent, ReplayResult, percentile, replay_call, transcript_script
from teleguard.serve.process import serving

DEMO_DIR = "serve-demo"  # inside the run folder: the server's configuration and log


def pick_calls(calls: Sequence[CallRecord], *, fraud: int = 2, normal: int = 2) -> list[CallRecord]:
    """The first `fraud` fraud and `normal` normal calls that have a transcript (deterministic)."""
    with_turns = [c for c in calls if c.turns]
    chosen = [c for c in with_turns if c.labels.is_fraud][:fraud] + [
        c for c in with_turns if not c.labels.is_fraud
    ][:normal]
    return chosen


def serve_config(model: Path, port: int) -> dict[str, Any]:
    """`teleguard serve --config` for the demo: the model folder alone decides how it is asked (its serving
    profile: prompts, transcript window, policy points, alert threshold, max tokens), as for a user who runs
    `teleguard serve --model DIR`; only the address, the CPU engine and patient timeouts are set here."""
    return {
        "name": "teleguard",
        "model": str(model),
        "host": "127.0.0.1",
        "port": port,
        "engine": {"kind": "transformers", "device": "cpu", "timeout_s": 120},
        "detector": {"engine_timeout_s": 120, "drain_seconds": 10},
        "grace_seconds": 5,
    }


def metric_counters(url: str) -> dict[str, float]:
    """teleguard_calls_completed_total by verdict and a few totals, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "teleguard_calls_completed_total":
                key = f"calls_completed{{verdict={sample.labels['verdict']}}}"
                out[key] = out.get(key, 0.0) + sample.value
            elif sample.name in (
                "teleguard_chunks_total",
                "teleguard_decisions_total",
                "teleguard_model_calls_total",
                "teleguard_alerts_total",
            ):  # summed: alerts_total and decisions_total have labels
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    done = sum(v for k, v in out.items() if k.startswith("calls_completed{"))
    out["fraud_rate"] = out.get("calls_completed{verdict=fraud}", 0.0) / done if done else 0.0
    return out


def _short(call_id: str) -> str:
    """A dialogue's id without its file ("normal_dialogues-2025.../tts_fraud_02076" -> "tts_fraud_02076")."""
    return call_id.rpartition("/")[2][:24]


def _decision_line(console: Console, source: dict[str, str], event: ReplayEvent) -> None:
    if event.kind != "decision":
        return
    d = event.data
    round_ = d["round"]
    value = {True: "[red]fraud[/red]", False: "[green]normal[/green]"}.get(
        d.get("is_fraud"), "[dim]none[/dim]"
    )
    if round_ != "is_fraud":
        value = str(d.get("scene" if round_ == "scene" else "fraud_type") or "[dim]none[/dim]")
    confidence = d.get("confidence")
    console.print(
        f"[dim]{event.at:6.2f}s[/dim] {_short(source.get(d['call_id'], d['call_id'])):<24} "
        f"{d['audio_time']:6.1f}s of call  {round_:<10} {value}"
        f"{' [bold red]ALERT[/bold red]' if d.get('alert') else ''}"
        f"  conf {'-' if confidence is None else f'{confidence:.2f}'}  {event.latency_s * 1000:.0f} ms",
        highlight=False,
        soft_wrap=True,
    )


async def replay_calls(
    url: str, calls: Sequence[CallRecord], *, speed: float, console: Console
) -> list[ReplayResult]:
    """Every call at once over its own WebSocket; decisions are printed as they arrive."""
    source: dict[str, str] = {}
    jobs = []
    for i, call in enumerate(calls):
        call_id = f"demo-{i}-{'fraud' if call.labels.is_fraud else 'normal'}"
        source[call_id] = call.call_id
        jobs.append(
            replay_call(
                url,
                transcript_script(call),
                speed=speed,
                call_id=call_id,
                timeout=120,
                on_event=lambda event: _decision_line(console, source, event),
            )
        )
    return list(await asyncio.gather(*jobs))


def verdicts_table(calls: Sequence[CallRecord], results: Sequence[ReplayResult]) -> Table:
    table = Table(title="live decisions on held-out calls (teleguard serve)", title_justify="left")
    for column in ("call", "label", "verdict", "alert at", "decisions", "call audio", "latency p50"):
        table.add_column(
            column, justify="left" if column in ("call", "label", "verdict") else "right", no_wrap=True
        )
    for call, r in zip(calls, results, strict=True):
        v = r.verdict
        answered = any(
            d.decision["round"] == "is_fraud" and d.decision["is_fraud"] is not None for d in r.decisions
        )
        verdict = (
            "[red]fraud[/red]" if v["is_fraud"] else "[green]normal[/green]" if answered else "undecided"
        )
        if v.get("fraud_type"):
            verdict += f" ({v['fraud_type']})"
        ok = bool(v["is_fraud"]) == call.labels.is_fraud and (answered or v["is_fraud"])
        label = ("fraud" if call.labels.is_fraud else "normal") + (
            " [green]✓[/green]" if ok else " [red]✗[/red]"
        )
        first = v.get("first_alert_time")
        p50 = percentile([d.latency_s for d in r.decisions], 50)
        table.add_row(
            _short(call.call_id),
            label,
            verdict,
            "-" if first is None else f"{first:.1f} s",
            str(v["decisions"]),
            f"{v['audio_seconds']:.1f} s",
            "-" if p50 is None else f"{p50 * 1000:.0f} ms",
        )
    return table


def run_demo(
    model: Path,
    calls: Sequence[CallRecord],
    workdir: Path,
    *,
    speed: float = 20.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Serve `model`, replay `calls` through it, print what happens; returns the figures (also as JSON in
    `workdir/serve-demo.json`)."""
    console = console or Console()
    config = serve_config(model, free_port())
    started = time.monotonic()
    with serving(config, workdir) as server:
        console.print(f"serving {model} on {server.url} (teleguard serve, transformers engine on CPU) ...")
        ready_s = server.wait_ready()
        console.print(
            f"ready after {ready_s:.1f} s; streaming {len(calls)} held-out calls as transcripts over the WebSocket "
            f"at {speed:g}x real time"
        )
        results = asyncio.run(replay_calls(server.url, calls, speed=speed, console=console))
        counters = metric_counters(server.url)
    exit_code = server.process.returncode if server.process else None
    console.print(verdicts_table(calls, results))
    completed = {k: int(v) for k, v in counters.items() if k.startswith("calls_completed")}
    console.print(
        "server /metrics: "
        + ", ".join(
            f"{k.removeprefix('teleguard_')} {int(v)}"
            for k, v in counters.items()
            if k.startswith("teleguard_")
        )
        + ", calls_completed_total "
        + " ".join(f"{k.split('=')[1].rstrip('}')}={v}" for k, v in completed.items())
        + f"; fraud rate {counters['fraud_rate']:.2f}",
        highlight=False,
    )
    summary = {
        "model": str(model),
        "url": server.url,
        "ready_s": round(ready_s, 2),
        "wall_s": round(time.monotonic() - started, 2),
        "server_exit_code": exit_code,
        "calls": [
            {
                "call_id": call.call_id,
                "label": "fraud" if call.labels.is_fraud else "normal",
                "verdict": r.verdict,
                "decisions": len(r.decisions),
                "decision_latency_p50_s": percentile([d.latency_s for d in r.decisions], 50),
            }
            for call, r in zip(calls, results, strict=True)
        ],
        "metrics": counters,
        "log": str(server.log),
    }
    (workdir / "serve-demo.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    console.print(
        # uvicorn re-raises SIGTERM once its graceful shutdown is done: -15 is a clean stop
        f"server drained and stopped (SIGTERM, exit code {exit_code}); demo took {summary['wall_s']:.0f} s; "
        f"log: {server.log}",
        highlight=False,
    )
    return summary


def demo_from_run(
    summary: dict[str, Any], *, console: Console | None = None, calls: int = 4
) -> dict[str, Any] | None:
    """The demo after a local pipeline run: the registered model (or the exported one when the gate failed)
    and held-out calls from the build-data step. Returns None (saying why) when either is missing."""
    from teleguard.data.dataset import read_calls

    console = console or Console()
    run_dir = Path(summary["run"])
    model: Path | None = None
    if summary.get("registered"):
        model = Path(summary["registered"])
    else:
        exported = run_dir / "export-model" / "model"
        if exported.is_dir():
            model = exported
            console.print(
                "[yellow]the quality gate did not pass, so nothing was registered: serving the export step's "
                f"model instead[/yellow] ({exported})"
            )
    test_calls = run_dir / "build-data" / "calls" / "test" / "calls.jsonl"
    if model is None or not (model / "config.json").is_file():
        console.print(
            "[yellow]no model to serve (the export step did not run): skipping the serving demo[/yellow]"
        )
        return None
    if not test_calls.is_file():
        console.print(f"[yellow]no held-out calls at {test_calls}: skipping the serving demo[/yellow]")
        return None
    chosen = pick_calls(read_calls(test_calls), fraud=calls // 2, normal=calls - calls // 2)
    return run_demo(model, chosen, run_dir / DEMO_DIR, console=console)
