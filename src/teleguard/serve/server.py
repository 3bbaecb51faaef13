"""The detector on KServe: a `kserve.Model`, KServe's REST routes, a WebSocket stream and plain call routes.

`TeleguardDetector` is the kserve.Model. `load()` finds the model (a local folder, KServe's storage-initializer
folder /mnt/models, or an s3:// / minio:// URI copied with teleguard.storage), builds the engine the
configuration names and the `Detector`. `predict` answers KServe V1 predict bodies whose instances are protocol
messages ({"action": "open" | "chunk" | "close", ...}) and V2 infer requests that classify a whole call.

`DetectorServer` runs it on uvicorn with KServe's REST server (V1/V2 routes, health, /metrics) plus:

- ``WS /v1/calls/stream``: JSON messages {"type": "open" | "chunk" | "close", ...}; answers "opened", "ack",
  "decision", "verdict" and "error" messages; the socket stays open after an error;
- ``POST /v1/calls``, ``POST /v1/calls/{call_id}/chunks``, ``POST /v1/calls/{call_id}/close``.

Readiness (/v2/health/ready, /v1/models/{name}, /v2/models/{name}/ready) is false until the model is loaded:
loading runs in the background after the server starts, so liveness answers while a large model loads. The
server binds 127.0.0.1 unless told otherwise (KServe's own REST server always binds 0.0.0.0). On shutdown it
turns unready, refuses new requests (503 shutting_down) and waits for the evaluations in flight before closing
connections. The protocol, routes and error codes are documented in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, exposition
from pydantic import BaseModel, ConfigDict, Field

from teleguard.serve.detector import Detector, DetectorConfig, Unavailable
from teleguard.serve.engine import EngineConfig, build_engine
from teleguard.serve.metrics import DetectorMetrics, default_metrics
from teleguard.serve.policy import DecisionPolicy, EngineRequest, Generate, Generation
from teleguard.serve.profile import apply_profile
from teleguard.serve.profile import describe as describe_profile
from teleguard.serve.protocol import RequestError

# kserve.model_server parses sys.argv with argparse when imported (ModelServer's flags, abbreviations allowed):
# `teleguard serve --timeout 2.5` would be read as its int --timeout-keep-alive and exit. It sees no arguments.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import Model
    from kserve.errors import ModelNotReady
    from kserve.model_repository import MODEL_MOUNT_DIRS, ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer
finally:
    sys.argv = _argv

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STREAM_ROUTE = "/v1/calls/stream"
MODEL_FILES = ("config.json",)


class ServeConfig(BaseModel):
    """Everything `teleguard serve` needs; a YAML file holds the same keys (engine/policy/detector sections)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="teleguard", pattern=r"^[A-Za-z0-9][\w.-]{0,62}$")  # /v1/models/{name}
    # A local folder, an s3:// or minio:// URI, or None for KServe's storage-initializer folder /mnt/models.
    # The remote engine needs none.
    model: str | None = None
    host: str = LOOPBACK  # 0.0.0.0 in a pod (teleguard serve --host 0.0.0.0)
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    policy: DecisionPolicy = Field(default_factory=DecisionPolicy)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024
    )  # one HTTP body (a chunk with 4 MiB of audio)
    ws_max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    grace_seconds: int = Field(default=30, ge=0)  # uvicorn's graceful shutdown after the detector drained


# --- finding the model ---------------------------------------------------------------------------------------


class ModelLocationError(ValueError):
    pass


def _model_folder(root: Path) -> Path:
    """The folder holding the model files: `root`, or its single subfolder that does (storage-initializer)."""
    if any((root / name).is_file() for name in MODEL_FILES):
        return root
    children = [d for d in root.iterdir() if d.is_dir() and any((d / n).is_file() for n in MODEL_FILES)]
    if len(children) == 1:
        return children[0]
    raise ModelLocationError(
        f"{root} holds no model: expected {', '.join(MODEL_FILES)} in it or in exactly one subfolder"
    )


def resolve_model(model: str | None, *, mount: str = MODEL_MOUNT_DIRS) -> Path:
    """A local model folder from a local path, an s3:// / minio:// URI (copied once, cached), or /mnt/models."""
    if model is None:
        root = Path(mount)
        if not root.is_dir():
            raise ModelLocationError(
                f"no --model given and {mount} (KServe's storage-initializer folder) does not exist"
            )
        return _model_folder(root)
    if model.startswith(("s3://", "minio://")):
        from teleguard.storage import local_copy

        return _model_folder(local_copy(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLocationError(f"model folder {path} does not exist")
    return _model_folder(path)


def _logging_prompts(generate: Generate) -> Generate:
    """The engine, logging every prompt it is sent (--log-level DEBUG: what the model is really asked)."""

    async def logged(requests: Sequence[EngineRequest]) -> Sequence[str | Generation]:
        for request in requests:
            log.debug("prompt for call %s, round %s: %s", request.call_id, request.round.value,
                      json.dumps(request.messages, ensure_ascii=False))  # fmt: skip
        return await generate(requests)

    return logged


# --- the kserve.Model ----------------------------------------------------------------------------------------

EngineFactory = Callable[[EngineConfig], Generate]


def _error_response(err: RequestError, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={**err.to_dict(), **extra})


class TeleguardDetector(Model):
    """The real-time detector as a KServe model."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        engine_factory: EngineFactory | None = None,
        metrics: DetectorMetrics | None = None,
    ) -> None:
        super().__init__(config.name)
        self.config = config
        self.engine_factory = engine_factory or build_engine
        self.metrics = metrics
        self.detector: Detector | None = None
        self.model_path: Path | None = None
        self.load_error: BaseException | None = None
        self._load_lock = threading.Lock()

    # --- loading -------------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Find the model, build the engine and the detector. Blocking; a second caller waits for the first."""
        if self.ready:
            return True
        if not self._load_lock.acquire(blocking=False):
            return False  # loading in another thread (KServe may call load() on a request before it is ready)
        try:
            if self.ready:
                return True
            engine_config = self.config.engine
            policy = self.config.policy
            local = engine_config.kind != "remote"
            if local and (self.engine_factory is build_engine or self.config.model or engine_config.model):
                self.model_path = resolve_model(self.config.model or engine_config.model)
                engine_config = engine_config.model_copy(update={"model": str(self.model_path)})
                # how the model was trained to be asked, unless the operator said otherwise
                policy, profile = apply_profile(self.model_path, policy)
                (log.info if profile else log.warning)("%s", describe_profile(profile, self.model_path))
            started = time.perf_counter()
            engine = self.engine_factory(engine_config)
            if log.isEnabledFor(logging.DEBUG):
                engine = _logging_prompts(engine)
            # one deadline per engine invocation: the tighter of the engine's and the detector's
            timeout = min(engine_config.timeout_s, self.config.detector.engine_timeout_s)
            self.detector = Detector(
                engine,
                policy=policy,
                config=self.config.detector.model_copy(update={"engine_timeout_s": timeout}),
                metrics=self.metrics or default_metrics(),
            )
            # a cascade counts its escalations where the detector counts its decisions
            if (bind_metrics := getattr(engine, "bind_metrics", None)) is not None:
                bind_metrics(self.detector.metrics)
            self.ready = True
            log.info(
                "model %s loaded (%s engine) in %.1f s",
                self.name,
                engine_config.kind,
                time.perf_counter() - started,
            )
            return True
        except BaseException as err:
            self.load_error = err
            raise
        finally:
            self._load_lock.release()

    def stop(self) -> None:
        self.ready = False

    def live_detector(self) -> Detector:
        """The detector, or 503 not_ready while the model loads (and after a failed load)."""
        if not self.ready or self.detector is None:
            detail = f": loading failed: {self.load_error}" if self.load_error else "; retry shortly"
            raise Unavailable("not_ready", f"model {self.name} is not loaded yet{detail}")
        return self.detector

    # --- KServe predict: V1 protocol messages, V2 single-shot classification --------------------------------

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        detector = self.live_detector()
        if isinstance(payload, InferRequest):
            return await self._infer_v2(detector, payload)
        return await self._predict_v1(detector, payload)

    async def _predict_v1(self, detector: Detector, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise detector.refuse(
                RequestError(
                    "invalid_request", 'a V1 predict body is {"instances": [message, ...]}', field="instances"
                )
            )
        predictions: list[dict[str, Any]] = []
        for index, instance in enumerate(payload["instances"]):
            try:
                predictions.append(await handle_message(detector, instance, key="action"))
            except RequestError as err:
                # earlier instances took effect: say which failed and what the others gave
                raise PartialFailure(err, index=index, predictions=predictions) from None
        return {"predictions": predictions}

    async def _infer_v2(self, detector: Detector, request: InferRequest) -> InferResponse:
        fields: dict[str, Any] = {}
        params = _plain_params(request.parameters)
        for name in ("language", "modality", "call_id", "channels", "sample_rate"):
            if name in params:
                fields[name] = params[name]
        segments: list[Any] = []
        for tensor in request.inputs:
            values = [
                v.decode("utf-8") if isinstance(v, bytes | bytearray) else v for v in _flat(tensor.data)
            ]
            if tensor.name == "segments":
                for i, value in enumerate(values):
                    try:
                        segments.append(json.loads(value) if isinstance(value, str) else value)
                    except json.JSONDecodeError as err:
                        raise detector.refuse(
                            RequestError(
                                "invalid_segment",
                                f"input 'segments' element {i} is not a JSON object: {err}",
                                field=f"segments.{i}",
                            )
                        ) from None
            elif tensor.name in ("wav", "audio"):
                if len(values) != 1 or not isinstance(values[0], str):
                    raise detector.refuse(
                        RequestError(
                            "invalid_request",
                            f"input '{tensor.name}' is one BYTES element of base64 (shape [1])",
                            field=tensor.name,
                        )
                    )
                fields[tensor.name] = values[0]
            else:
                raise detector.refuse(
                    RequestError(
                        "invalid_request",
                        f"unknown input '{tensor.name}'; inputs are 'segments', 'wav' and 'audio'",
                        field=tensor.name,
                    )
                )
        for name in ("channels", "sample_rate"):
            if name in fields and not isinstance(fields[name], int):
                raise detector.refuse(
                    RequestError("invalid_request", f"parameter '{name}' must be an integer", field=name)
                )
        result = await detector.classify(segments=segments, **fields)
        verdict = result.verdict
        outputs = [
            InferOutput("is_fraud", [1], "BOOL", [verdict.is_fraud]),
            InferOutput("fraud_type", [1], "BYTES", [verdict.fraud_type or ""]),
            InferOutput("scene", [1], "BYTES", [verdict.scene or ""]),
            InferOutput(
                "confidence", [1], "FP32", [-1.0 if verdict.confidence is None else verdict.confidence]
            ),
            InferOutput("verdict", [1], "BYTES", [verdict.model_dump_json()]),
            InferOutput(
                "decisions", [len(result.decisions)], "BYTES", [d.model_dump_json() for d in result.decisions]
            ),
        ]
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs
        )


class PartialFailure(RequestError):
    """A V1 predict whose instance `index` failed; the instances before it took effect."""

    def __init__(self, err: RequestError, *, index: int, predictions: list[dict[str, Any]]) -> None:
        super().__init__(err.reason, f"instance {index}: {err.message}", field=err.field, status=err.status)
        self.cause, self.index, self.predictions = err, index, predictions

    def to_dict(self) -> dict[str, Any]:
        body = self.cause.to_dict()
        body.update(message=self.message, index=self.index, predictions=self.predictions)
        return body


def _flat(data: Any) -> list[Any]:
    if hasattr(data, "tolist"):
        data = data.tolist()
    out: list[Any] = []
    for item in data or []:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def _plain_params(params: Any) -> dict[str, Any]:
    if not params:
        return {}
    out = {}
    for key, value in dict(params).items():
        for attr in ("string_param", "int64_param", "bool_param", "double_param"):
            if hasattr(value, "HasField") and value.HasField(attr):
                value = getattr(value, attr)
                break
        out[key] = value
    return out


# --- protocol messages (shared by V1 predict, the WebSocket and the REST routes) -----------------------------


async def handle_message(detector: Detector, message: Any, *, key: str) -> dict[str, Any]:
    """One protocol message {key: "open" | "chunk" | "close", ...fields} → its answer (RequestError if bad)."""
    if not isinstance(message, dict):
        raise detector.refuse(
            RequestError("invalid_request", f"a message is a JSON object, got {type(message).__name__}")
        )
    fields = dict(message)
    kind = fields.pop(key, None)
    if kind == "open":
        opened = await detector.open(fields)
        return {key: "opened", "call_id": opened.call_id}
    if kind == "chunk":
        result = await detector.chunk(fields)
        return {key: "ack", **result.to_dict()}
    if kind == "close":
        closed = await detector.close(fields)
        return {key: "verdict", **closed.to_dict()}
    raise detector.refuse(
        RequestError(
            "invalid_request", f"field '{key}' must be open, chunk or close, got {kind!r}", field=key
        )
    )


# --- the app: KServe's routes plus the streaming and call routes ---------------------------------------------


class _ReadyDataPlane(DataPlane):
    """KServe's data plane whose server readiness (/v2/health/ready) waits for every model to be loaded."""

    async def ready(self) -> bool:
        models = self.model_registry.get_models().values()
        return await super().ready() and bool(models) and all([await m.healthy() for m in models])


class _CombinedRegistry:
    """The default registry (KServe's metrics) and a detector's own, served together on /metrics.

    Families the detector's registry has are left out of the default one: another detector in the same process
    (tests) may have registered teleguard metrics there, and a scrape holding a family twice is refused."""

    def __init__(self, default: Any, own: Any) -> None:
        self.default, self.own = default, own

    def collect(self) -> Any:
        own = list(self.own.collect())
        names = {family.name for family in own}
        yield from own
        yield from (family for family in self.default.collect() if family.name not in names)


def _json_body_limit(request: Request, limit: int) -> RequestError | None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return RequestError("payload_too_large", f"the body holds {length} bytes; at most {limit}")
    return None


async def _read_json(request: Request, detector: Detector, limit: int) -> Any:
    if (err := _json_body_limit(request, limit)) is not None:
        raise detector.refuse(err)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise detector.refuse(
                RequestError("payload_too_large", f"the body holds more than {limit} bytes")
            )
    if not body:
        return {}
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise detector.refuse(RequestError("invalid_request", f"the body is not JSON: {err}")) from None


class _DrainingServer(uvicorn.Server):
    """uvicorn that drains the detector (unready, refuse new requests, finish evaluations) before closing."""

    def __init__(self, config: uvicorn.Config, model: TeleguardDetector, drain_seconds: float) -> None:
        super().__init__(config)
        self.model, self.drain_seconds = model, drain_seconds

    async def shutdown(self, sockets: Any = None) -> None:
        self.model.ready = False
        if self.model.detector is not None:
            await self.model.detector.drain(self.drain_seconds)
        await super().shutdown(sockets)


class _TeleguardRESTServer(RESTServer):
    """KServe's REST server on a fresh FastAPI app (several servers per process, tests) and a chosen host."""

    def __init__(self, app: FastAPI, *args: Any, host: str, **kwargs: Any) -> None:
        super().__init__("kserve.model_server:app", *args, **kwargs)
        self.app = app
        self.config.app = app
        self.config.host = host

    def create_application(self) -> None:
        self._add_middlewares(self.app)
        self._register_endpoints(self.app)
        self._add_exception_handlers(self.app)


class DetectorServer:
    """The detector behind KServe's REST server on uvicorn, with the streaming and call routes."""

    def __init__(self, model: TeleguardDetector, *, load_in_background: bool = True) -> None:
        self.model = model
        self.config = model.config
        self.load_in_background = load_in_background
        self.repository = ModelRepository()
        self.repository.update(model)
        self.dataplane = _ReadyDataPlane(model_registry=self.repository)
        self.app = FastAPI(
            title="teleguard detector",
            docs_url=None,
            redoc_url=None,
            lifespan=self._lifespan,
        )
        self._add_routes(self.app)
        self.rest = _TeleguardRESTServer(
            self.app,
            self.dataplane,
            ModelRepositoryExtension(model_registry=self.repository),
            self.config.port,
            host=self.config.host,
            grace_period=self.config.grace_seconds,
            event_loop="asyncio",
        )
        self.rest.config.ws_max_size = self.config.ws_max_message_bytes
        self.server = _DrainingServer(self.rest.config, model, self.config.detector.drain_seconds)
        self.rest._server = self.server
        self._thread: threading.Thread | None = None
        self._load_task: asyncio.Future[Any] | None = None

    # --- lifetime ----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if self.load_in_background:
            self._load_task = asyncio.ensure_future(self._load(loop))
        else:
            await self._load(loop)
        try:
            yield
        finally:
            if self._load_task is not None and not self._load_task.done():
                self._load_task.cancel()
            if self.model.detector is not None:
                await self.model.detector.aclose(0)

    async def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.run_in_executor(None, self.model.load)
        except Exception:
            log.exception("loading model %s failed; the server stays unready", self.model.name)
            return
        if self.model.detector is not None:
            await self.model.detector.start()

    @property
    def port(self) -> int:
        """The bound port (the chosen one when the config said 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.port

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else LOOPBACK
        return f"http://{host}:{self.port}"

    async def serve(self) -> None:
        """Serve until stopped (SIGTERM/SIGINT in the main thread, or `stop()`)."""
        await self.rest.start()

    def start_in_thread(self, timeout: float = 30.0) -> DetectorServer:
        """Serve on a background thread (tests); returns once the socket is bound (not necessarily loaded)."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve()), name="teleguard-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the detector server did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.model.ready:
            if self.model.load_error is not None:
                raise RuntimeError(
                    f"loading the model failed: {self.model.load_error}"
                ) from self.model.load_error
            if time.monotonic() > deadline:
                raise TimeoutError("the model did not load in time")
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully (drain, then close) and wait for the serving thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    # --- routes ------------------------------------------------------------------------------------------

    def _add_routes(self, app: FastAPI) -> None:
        model, limit = self.model, self.config.max_body_bytes

        @app.exception_handler(RequestError)
        async def request_error(_request: Request, err: RequestError) -> JSONResponse:
            return _error_response(err)

        @app.exception_handler(ModelNotReady)
        async def not_ready(_request: Request, err: ModelNotReady) -> JSONResponse:
            return _error_response(Unavailable("not_ready", str(err)))

        metrics = model.metrics
        if metrics is not None and metrics.registry is not REGISTRY:
            combined = _CombinedRegistry(REGISTRY, metrics.registry)

            @app.get("/metrics")
            async def metrics_route(request: Request) -> Any:
                encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
                return Response(content=encoder(combined), headers={"content-type": content_type})

        @app.post("/v1/calls", status_code=201)
        async def open_call(request: Request) -> Any:
            detector = model.live_detector()
            body = await _read_json(request, detector, limit)
            opened = await detector.open(body)
            return {"call_id": opened.call_id, "opened": True}

        @app.post("/v1/calls/{call_id}/chunks")
        async def send_chunk(call_id: str, request: Request) -> Any:
            detector = model.live_detector()
            body = await _read_json(request, detector, limit)
            _with_call_id(detector, body, call_id)
            return (await detector.chunk(body)).to_dict()

        @app.post("/v1/calls/{call_id}/close")
        async def close_call(call_id: str, request: Request) -> Any:
            detector = model.live_detector()
            body = await _read_json(request, detector, limit)
            _with_call_id(detector, body, call_id)
            return (await detector.close(body)).to_dict()

        @app.websocket(STREAM_ROUTE)
        async def stream(websocket: WebSocket) -> None:
            await CallStream(model, websocket).run()


def _with_call_id(detector: Detector, body: Any, call_id: str) -> None:
    if not isinstance(body, dict):
        raise detector.refuse(RequestError("invalid_request", "the body is a JSON object"))
    given = body.setdefault("call_id", call_id)
    if given != call_id:
        raise detector.refuse(
            RequestError(
                "invalid_request", f"the body names call {given!r}, the path {call_id!r}", field="call_id"
            )
        )


class CallStream:
    """One WebSocket: messages are handled as they arrive (chunks of several calls may interleave); answers are
    sent as they are ready. Errors are "error" messages; the socket stays open."""

    def __init__(self, model: TeleguardDetector, websocket: WebSocket) -> None:
        self.model, self.ws = model, websocket
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = True

    async def send(self, message: dict[str, Any]) -> None:
        if not self._open:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(message, ensure_ascii=False))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._open = False

    async def error(self, err: RequestError, message: Any = None) -> None:
        body: dict[str, Any] = {
            "type": "error",
            "reason": err.reason,
            "status": err.status,
            "field": err.field,
        }
        body["message"] = err.message
        if isinstance(err, Unavailable):
            body.update(
                {k: v for k, v in err.to_dict().items() if k in ("call_id", "seq", "accepted", "retryable")}
            )
        elif isinstance(message, dict):
            for name in ("call_id", "seq"):
                if name in message:
                    body[name] = message[name]
        await self.send(body)

    async def run(self) -> None:
        await self.ws.accept()
        try:
            while True:
                event = await self.ws.receive()
                if event["type"] == "websocket.disconnect":
                    break
                raw = event.get("text")
                if raw is None and event.get("bytes") is not None:
                    raw = event["bytes"]
                await self.dispatch(raw)
        except WebSocketDisconnect:
            pass
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def dispatch(self, raw: Any) -> None:
        try:
            detector = self.model.live_detector()
        except RequestError as err:
            await self.error(err)
            return
        try:
            message = json.loads(raw)
        except (TypeError, ValueError) as err:
            await self.error(
                detector.refuse(RequestError("invalid_request", f"a message is JSON text: {err}"))
            )
            return
        # Each message is handled in its own task, started in arrival order: a chunk's sequence check runs
        # before the task's first await, so the order of chunks is the order they arrived in.
        task = asyncio.ensure_future(self.handle(detector, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)

    async def handle(self, detector: Detector, message: Any) -> None:
        try:
            # counted in flight until the answer is sent: shutdown drains decisions, not only evaluations
            with detector.request():
                await self.answer(await handle_message(detector, message, key="type"))
        except RequestError as err:
            await self.error(err, message)
        except Exception as err:  # a bug must not kill the socket
            log.exception("websocket message failed")
            await self.error(
                RequestError("internal_error", f"{type(err).__name__}: {err}", status=500), message
            )

    async def answer(self, answer: dict[str, Any]) -> None:
        kind = answer["type"]
        if kind == "opened":
            await self.send(answer)
        elif kind == "ack":
            await self.send(
                {
                    "type": "ack",
                    "call_id": answer["call_id"],
                    "seq": answer["seq"],
                    "duplicate": answer["duplicate"],
                }
            )
            for decision in answer["decisions"]:
                await self.send({"type": "decision", **decision})
        else:
            for decision in answer["decisions"]:
                await self.send({"type": "decision", **decision})
            await self.send({"type": "verdict", **answer["verdict"]})


def build_server(
    config: ServeConfig,
    *,
    engine_factory: EngineFactory | None = None,
    metrics: DetectorMetrics | None = None,
    load_in_background: bool = True,
) -> DetectorServer:
    """The server for a configuration (tests inject an engine factory and a metrics registry)."""
    model = TeleguardDetector(config, engine_factory=engine_factory, metrics=metrics)
    return DetectorServer(model, load_in_background=load_in_background)
