"""The detector's own HTTP and WebSocket routes, beside KServe's V1/V2 routes.

- ``WS /v1/calls/stream``: JSON messages {"type": "open" | "chunk" | "close" | "resume", ...}; answers "opened",
  "ack", "decision", "verdict", "resumed" and "error" messages; the socket stays open after an error
  (`CallStream`). A client whose socket dropped (its replica drained or died) reconnects, to any replica with a
  shared store, and resumes: `{"type": "resume", "call_id"}` answers the last chunk taken;
- ``POST /v1/calls``, ``POST /v1/calls/{call_id}/chunks``, ``POST /v1/calls/{call_id}/close``,
  ``GET /v1/calls/{call_id}`` (the resume answer);
- ``GET /metrics`` with the detector's own registry when it has one (beside KServe's metrics).

Errors are `RequestError` bodies with their HTTP status (docs/serving.md lists them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, exposition

from teleguard.serve._kserve import ModelNotReady
from teleguard.serve.detector import Detector, Unavailable
from teleguard.serve.model import TeleguardDetector, handle_message
from teleguard.serve.protocol import RequestError

log = logging.getLogger(__name__)

STREAM_ROUTE = "/v1/calls/stream"


def _error_response(err: RequestError, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={**err.to_dict(), **extra})


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


def add_routes(app: FastAPI, model: TeleguardDetector, *, max_body_bytes: int) -> None:
    """The call routes, the WebSocket stream and (with the detector's own registry) /metrics on `app`."""
    limit = max_body_bytes

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

    @app.get("/v1/calls/{call_id}")
    async def call_status(call_id: str) -> Any:
        # the REST form of the WebSocket's resume: where the call stands, from any replica
        detector = model.live_detector()
        return (await detector.resume({"call_id": call_id})).to_dict()

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
        if kind in ("opened", "resumed"):
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
