"""`teleguard serve`: the real-time detector on KServe (see docs/serving.md)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from pydantic import ValidationError
from rich.console import Console

from teleguard.yaml_files import field_errors, read_mapping

err_console = Console(stderr=True, soft_wrap=True)


class ServeConfigError(ValueError):
    pass


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def load_serve_config(file: Path | None, overrides: dict[str, Any]) -> Any:
    """The server configuration: the YAML file's sections, then the command-line options given (dotted keys)."""
    from teleguard.serve.server import ServeConfig

    raw: dict[str, Any] = read_mapping(file, "server configuration", ServeConfigError) if file else {}
    for key, value in overrides.items():
        if value is None:
            continue
        *sections, name = key.split(".")
        target = raw
        for depth, section in enumerate(sections, 1):
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ServeConfigError(f"{file}: section '{'.'.join(sections[:depth])}' must be a mapping")
        target[name] = value
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        where = f"{file}: " if file else ""
        raise ServeConfigError(where + "; ".join(field_errors(err))) from None


def cascade_overrides(
    *,
    url: str | None,
    model: str | None,
    model_dir: str | None,
    threshold: float | None,
    timeout: float | None,
    engine: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The `engine.cascade.*` overrides of the --escalate-* options (empty when none is given).

    --escalate-url with --escalate-model: a remote large engine; --escalate-model-dir: a local one run by the
    served engine's kind (transformers unless --engine vllm) on the same --device. --escalation-threshold and
    --escalation-timeout alone adjust a cascade the --config file sets up.
    """
    if url and model_dir:
        raise ServeConfigError("--escalate-url and --escalate-model-dir exclude each other: one large model")
    if model and not url:
        raise ServeConfigError(
            "--escalate-model names the model --escalate-url serves; for a local folder use --escalate-model-dir"
        )
    if url and not model:
        raise ServeConfigError("--escalate-url needs --escalate-model (the model name the endpoint serves)")
    out: dict[str, Any] = {}
    prefix = "engine.cascade."
    if url:
        out |= {f"{prefix}large.kind": "remote", f"{prefix}large.url": url, f"{prefix}large.model": model}
    elif model_dir:
        kind = engine if engine in ("transformers", "vllm") else "transformers"
        out |= {f"{prefix}large.kind": kind, f"{prefix}large.model": model_dir}
        if device is not None:
            out[f"{prefix}large.device"] = device
    if threshold is not None:
        out[f"{prefix}threshold"] = threshold
    if timeout is not None:
        out[f"{prefix}large.timeout_s"] = timeout
    return out


class _ServerLog(logging.StreamHandler):  # type: ignore[type-arg]
    """The server's console log. Its own class: loading ms-swift turns every root handler whose type is exactly
    StreamHandler down to ERROR (to quiet other ranks), which would hide --log-level INFO/DEBUG.

    It writes to whatever `sys.stderr` is when a record comes, not the one it was made with: a command run in
    process (typer's test runner, a notebook) swaps stderr and closes its copy, and a later server's log would
    fail on the closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def serve_command(
    model: Annotated[
        str | None,
        typer.Option(
            help="model folder, s3:// or minio:// URI; default: /mnt/models (KServe storage-initializer)"
        ),
    ] = None,
    engine: Annotated[str | None, typer.Option(help="transformers, vllm or remote")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML file: name, model, host, port, engine, policy, detector"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8080)")] = None,
    name: Annotated[str | None, typer.Option(help="model name in KServe routes (default teleguard)")] = None,
    url: Annotated[
        str | None, typer.Option(help="remote engine: OpenAI-compatible API base URL (…/v1)")
    ] = None,
    served_model: Annotated[str | None, typer.Option(help="remote engine: the model name it serves")] = None,
    model_type: Annotated[
        str | None, typer.Option(help="ms-swift model_type of a local model folder")
    ] = None,
    template: Annotated[str | None, typer.Option(help="ms-swift template of a local model folder")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (transformers; vllm: cpu needs vLLM's CPU build)")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="tokens per answer")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds per engine invocation before a 503")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="requests per batched engine call")] = None,
    language: Annotated[str | None, typer.Option(help="prompt language: zh or en")] = None,
    prompts_file: Annotated[
        str | None, typer.Option(help="the prompt file the model was trained with")
    ] = None,
    alert_threshold: Annotated[float | None, typer.Option(help="confidence needed for a fraud alert")] = None,
    every_seconds: Annotated[
        float | None, typer.Option(help="evaluate every N seconds of new call audio")
    ] = None,
    max_calls: Annotated[int | None, typer.Option(help="open calls at most (429 beyond)")] = None,
    ttl: Annotated[float | None, typer.Option(help="seconds before an idle call expires")] = None,
    session_store: Annotated[
        str | None,
        typer.Option(
            envvar="TELEGUARD_SESSION_STORE",
            show_envvar=True,
            help="where live calls are kept: memory (this process; one replica) or redis://host:port/db, "
            "shared by every replica (a password in the URL: pass it through the environment variable)",
        ),
    ] = None,
    escalate_url: Annotated[
        str | None,
        typer.Option(
            help="confidence cascade: the large model's OpenAI-compatible API base URL (…/v1); unsure "
            "answers of the served model are asked again there"
        ),
    ] = None,
    escalate_model: Annotated[
        str | None, typer.Option(help="confidence cascade: the model name --escalate-url serves")
    ] = None,
    escalate_model_dir: Annotated[
        str | None,
        typer.Option(
            help="confidence cascade: a local large model folder (or s3:// URI), run like --model "
            "(transformers or vllm, same --device)"
        ),
    ] = None,
    escalation_threshold: Annotated[
        float | None,
        typer.Option(
            help="confidence cascade: escalate answers whose confidence is below this (default 0.7)"
        ),
    ] = None,
    escalation_timeout: Annotated[
        float | None,
        typer.Option(
            help="confidence cascade: seconds the large model may take before the small answer stands "
            "(default: half of --timeout)"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Serve the real-time detector: KServe V1/V2 routes, a WebSocket stream, REST call routes, /metrics."""
    from teleguard.serve.server import build_server

    # after the import: importing kserve configures logging (root at INFO), which would undo --log-level
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_ServerLog()],
        force=True,
    )
    if engine == "remote" and served_model is None and model is not None:
        served_model = model
        model = None
    try:
        cascade = cascade_overrides(
            url=escalate_url,
            model=escalate_model,
            model_dir=escalate_model_dir,
            threshold=escalation_threshold,
            timeout=escalation_timeout,
            engine=engine,
            device=device,
        )
    except ServeConfigError as err:
        _fail(str(err))
    overrides = {
        "model": model,
        "host": host,
        "port": port,
        "name": name,
        "engine.kind": engine,
        "engine.url": url,
        "engine.model": served_model,
        "engine.model_type": model_type,
        "engine.template": template,
        "engine.device": device,
        "engine.max_tokens": max_tokens,
        "policy.max_tokens": max_tokens,  # per answer: wins over the profile's, as an option does
        "engine.timeout_s": timeout,
        "engine.max_batch_size": max_batch_size,
        "policy.language": language,
        "policy.prompts_file": prompts_file,
        "policy.alert_threshold": alert_threshold,
        "policy.every_seconds": every_seconds,
        "detector.max_calls": max_calls,
        "detector.ttl_seconds": ttl,
        "detector.session_store": session_store,
        "detector.engine_timeout_s": timeout,
        **cascade,
    }
    try:
        serve_config = load_serve_config(config, overrides)
    except ServeConfigError as err:
        _fail(str(err))
    from teleguard.serve.store import redact

    server = build_server(serve_config)
    err_console.print(
        f"teleguard detector '{serve_config.name}' on http://{serve_config.host}:{serve_config.port} "
        f"({serve_config.engine.kind} engine, calls kept in {redact(serve_config.detector.session_store)}); "
        "ready once the model has loaded",
        highlight=False,
    )
    asyncio.run(server.serve())


# --- teleguard stream ----------------------------------------------------------------------------------------


def _label(decision: dict[str, Any]) -> str:
    round_ = decision.get("round")
    if round_ == "is_fraud":
        value = decision.get("is_fraud")
        return {True: "[red]fraud[/red]", False: "[green]normal[/green]"}.get(value, "[dim]none[/dim]")
    return str(decision.get("scene" if round_ == "scene" else "fraud_type") or "[dim]none[/dim]")


def print_event(console: Console, event: Any, *, verbose: bool = False) -> None:
    """One replay event as a line: decisions always, acks only when verbose."""
    if event.kind == "decision":
        d = event.data
        confidence = d.get("confidence")
        alert = " [bold red]ALERT[/bold red]" if d.get("alert") else ""
        console.print(
            f"[dim]{event.at:7.2f}s[/dim] chunk {d['seq']:>3}  {d['round']:<10} {_label(d)}{alert}"
            f"  conf {'-' if confidence is None else f'{confidence:.2f}'}  call audio {d['audio_time']:.1f}s"
            f"  model {d['latency_s'] * 1000:.0f} ms  client {event.latency_s * 1000:.0f} ms"
            + (f"  [dim]{d['reason'][:80]}[/dim]" if d.get("reason") else ""),
            highlight=False,
        )
    elif event.kind == "ack" and verbose:
        rtt = "" if event.latency_s is None else f"  round trip {event.latency_s * 1000:.0f} ms"
        dup = " (duplicate)" if event.data.get("duplicate") else ""
        console.print(
            f"[dim]{event.at:7.2f}s chunk {event.data['seq']:>3} acked{dup}{rtt}[/dim]", highlight=False
        )
    elif event.kind == "opened" and verbose:
        console.print(f"[dim]call {event.data.get('call_id')} opened[/dim]", highlight=False)


def verdict_table(result: Any, script: Any) -> Any:
    """The verdict and the client's timings as a rich table."""
    from rich.table import Table

    from teleguard.serve.client import percentile

    v = result.verdict
    table = Table(title=f"verdict for {script.source_id} (call {result.call_id})", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    fraud = "[bold red]FRAUD[/bold red]" if v.get("is_fraud") else "[green]normal[/green]"
    table.add_row("verdict", fraud + (f" ({v['fraud_type']})" if v.get("fraud_type") else ""))
    if script.labels is not None:
        expected = "fraud" if script.labels.is_fraud else "normal"
        right = bool(v.get("is_fraud")) == script.labels.is_fraud
        table.add_row(
            "source label", f"{expected} ({'[green]agrees[/green]' if right else '[red]differs[/red]'})"
        )
    for key in ("scene", "confidence", "first_alert_time", "alerts", "decisions", "model_calls", "chunks"):
        value = v.get(key)
        table.add_row(
            key.replace("_", " "),
            "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value),
        )
    table.add_row("call audio", f"{v.get('audio_seconds', 0.0):.1f} s, streamed in {result.wall_s:.1f} s")
    rtts = [c.round_trip_s for c in result.chunks if c.round_trip_s is not None]
    lat = [d.latency_s for d in result.decisions]
    for name, values in (("chunk round trip", rtts), ("decision latency (client)", lat)):
        if values:
            p50, p99 = percentile(values, 50), percentile(values, 99)
            table.add_row(name, f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms ({len(values)})")
    if v.get("reason"):
        table.add_row("reason", str(v["reason"]))
    return table


def stream_command(
    call: Annotated[
        Path,
        typer.Argument(
            help="an audio file (WAV/MP3/FLAC), a teleguard calls JSONL or a TeleAntiFraud dialogue file"
        ),
    ],
    url: Annotated[
        str, typer.Option(help="the detector, e.g. http://127.0.0.1:8080")
    ] = "http://127.0.0.1:8080",
    speed: Annotated[
        float, typer.Option(min=0, help="1: real time; X: X times faster; 0: as fast as possible")
    ] = 1.0,
    http: Annotated[
        bool, typer.Option("--http", help="use the REST call routes instead of the WebSocket")
    ] = False,
    index: Annotated[
        int | None, typer.Option(help="which call of a transcript file (0-based; default 0)")
    ] = None,
    call_id: Annotated[
        str | None, typer.Option("--call-id", help="which call of a transcript file, by call id (or tts_id)")
    ] = None,
    server_call_id: Annotated[
        str | None, typer.Option(help="the id to open the call with on the server (default: generated)")
    ] = None,
    chunk_seconds: Annotated[float, typer.Option(min=0.05, help="audio: seconds of audio per chunk")] = 1.0,
    language: Annotated[str | None, typer.Option(help="prompt language for the call: zh or en")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for any one answer")] = 120.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also print every ack")] = False,
) -> None:
    """Replay a call against a running detector in real time (or faster) and print its decisions and verdict."""
    from teleguard.serve.client import CallSourceError, StreamError, load_call, replay_call

    console = Console(highlight=False, soft_wrap=True)  # a decision stays on one line
    if language not in (None, "zh", "en"):
        _fail(f"--language is zh or en, not {language!r}")
    try:
        script = load_call(
            call,
            index=index,
            call_id=call_id,
            chunk_seconds=chunk_seconds,
            language=language,  # type: ignore[arg-type]
        )
    except CallSourceError as err:
        _fail(str(err))
    transport = "http" if http else "ws"
    console.print(
        f"streaming {script.kind} {script.source_id} ({len(script.chunks)} chunks, {script.duration:.1f} s of call)"
        f" to {url} over {'HTTP' if http else 'WebSocket'}"
        + (" as fast as possible" if speed == 0 else f" at {speed:g}x"),
    )
    try:
        result = asyncio.run(
            replay_call(
                url,
                script,
                speed=speed,
                transport=transport,
                call_id=server_call_id,
                timeout=timeout,
                on_event=lambda event: print_event(console, event, verbose=verbose),
            )
        )
    except StreamError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    console.print(verdict_table(result, script))
