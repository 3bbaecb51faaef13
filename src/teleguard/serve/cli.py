"""`teleguard serve`: the real-time detector on KServe (see docs/serving.md)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

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
        section, _, name = key.rpartition(".")
        target = raw
        if section:
            target = raw.setdefault(section, {})
            if not isinstance(target, dict):
                raise ServeConfigError(f"{file}: section '{section}' must be a mapping")
        target[name] = value
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        where = f"{file}: " if file else ""
        raise ServeConfigError(where + "; ".join(field_errors(err))) from None


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
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (transformers engine)")] = None,
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
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Serve the real-time detector: KServe V1/V2 routes, a WebSocket stream, REST call routes, /metrics."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine == "remote" and served_model is None and model is not None:
        served_model = model
        model = None
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
        "engine.timeout_s": timeout,
        "engine.max_batch_size": max_batch_size,
        "policy.language": language,
        "policy.prompts_file": prompts_file,
        "policy.alert_threshold": alert_threshold,
        "policy.every_seconds": every_seconds,
        "detector.max_calls": max_calls,
        "detector.ttl_seconds": ttl,
        "detector.engine_timeout_s": timeout,
    }
    try:
        serve_config = load_serve_config(config, overrides)
    except ServeConfigError as err:
        _fail(str(err))
    from teleguard.serve.server import build_server

    server = build_server(serve_config)
    err_console.print(
        f"teleguard detector '{serve_config.name}' on http://{serve_config.host}:{serve_config.port} "
        f"({serve_config.engine.kind} engine); ready once the model has loaded",
        highlight=False,
    )
    asyncio.run(server.serve())
