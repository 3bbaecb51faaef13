"""The detector server: KServe's REST server on uvicorn around the `TeleguardDetector` model.

`DetectorServer` runs the model (`teleguard.serve.model`) with KServe's REST server (V1/V2 routes, health,
/metrics) and the detector's own call and WebSocket routes (`teleguard.serve.routes`). `ServeConfig` is what
`teleguard serve` is given; `build_server` puts the pieces together.

Readiness (/v2/health/ready, /v1/models/{name}, /v2/models/{name}/ready) is false until the model is loaded:
loading runs in the background after the server starts, so liveness answers while a large model loads. The
server binds 127.0.0.1 unless told otherwise (KServe's own REST server always binds 0.0.0.0). On shutdown it
turns unready, refuses new requests (503 shutting_down) and waits for the evaluations in flight before closing
connections. The protocol, routes and error codes are documented in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from teleguard.engines.contract import EngineConfig
from teleguard.loopback import LOOPBACK
from teleguard.serve._kserve import (
    DataPlane,
    ModelNotReady,
    ModelRepository,
    ModelRepositoryExtension,
    RESTServer,
    ServerNotReady,
    metrics_handler,
    register_v1_endpoints,
    register_v2_endpoints,
)
from teleguard.serve.detector import DetectorConfig
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.model import EngineFactory, PartialFailure, TeleguardDetector, handle_message
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.routes import STREAM_ROUTE, CallStream, add_routes
from teleguard.storage import MODEL_FILES, ModelLocationError, resolve_model

# Names this module has always offered, wherever they live now.
__all__ = [
    "LOOPBACK",
    "MODEL_FILES",
    "STREAM_ROUTE",
    "CallStream",
    "DetectorServer",
    "EngineFactory",
    "ModelLocationError",
    "PartialFailure",
    "ServeConfig",
    "TeleguardDetector",
    "build_server",
    "handle_message",
    "resolve_model",
]

log = logging.getLogger(__name__)


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


class _ReadyDataPlane(DataPlane):
    """KServe's data plane whose server readiness (/v2/health/ready) waits for every model to be loaded."""

    async def ready(self) -> bool:
        models = self.model_registry.get_models().values()
        return await super().ready() and bool(models) and all([await m.healthy() for m in models])


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


async def _not_ready(_request: Request, err: Exception) -> JSONResponse:
    """503 with KServe's body, logged by the access log only."""
    return JSONResponse(status_code=503, content={"error": str(err)})


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
        # KServe logs each not-ready answer as an error with a traceback; probes ask every few seconds for as
        # long as a model loads (minutes for a 7B model), so that is an answer, not an error.
        self.app.add_exception_handler(ServerNotReady, _not_ready)
        self.app.add_exception_handler(ModelNotReady, _not_ready)

    def _register_endpoints(self, app: FastAPI) -> None:
        # KServe's routes less its OpenAI layer: teleguard serves none of it, and importing it imports vLLM
        # (about 25 s on a CPU), which a replica taking over calls should not wait for.
        app.add_api_route("/", self.dataplane.live)
        app.add_api_route("/metrics", metrics_handler, methods=["GET"])
        register_v1_endpoints(app, self.dataplane, self.model_repository_extension)
        register_v2_endpoints(app, self.dataplane, self.model_repository_extension)


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
        add_routes(self.app, model, max_body_bytes=self.config.max_body_bytes)
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
