"""The detector as a KServe model: `TeleguardDetector`, and the protocol messages its routes share.

`load()` finds the model (a local folder, KServe's storage-initializer folder /mnt/models, or an s3:// /
minio:// URI copied with teleguard.storage), builds the engine the configuration names
(`teleguard.engines.factory.build_engine`, or an injected factory) and the `Detector`. `predict` answers KServe
V1 predict bodies whose instances are protocol messages ({"action": "open" | "chunk" | "close", ...}) and V2
infer requests that classify a whole call. `handle_message` answers one protocol message for V1 predict, the
WebSocket and the REST call routes alike.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teleguard.engines.contract import EngineConfig, EngineRequest, Generate, Generation
from teleguard.engines.factory import build_engine
from teleguard.serve._kserve import InferOutput, InferRequest, InferResponse, Model
from teleguard.serve.detector import Detector, Unavailable
from teleguard.serve.metrics import DetectorMetrics, default_metrics
from teleguard.serve.profile import apply_profile
from teleguard.serve.profile import describe as describe_profile
from teleguard.serve.protocol import RequestError
from teleguard.storage import resolve_model

if TYPE_CHECKING:  # the server module assembles the app around this model
    from teleguard.serve.server import ServeConfig

log = logging.getLogger(__name__)


def _logging_prompts(generate: Generate) -> Generate:
    """The engine, logging every prompt it is sent (--log-level DEBUG: what the model is really asked)."""

    async def logged(requests: Sequence[EngineRequest]) -> Sequence[str | Generation]:
        for request in requests:
            log.debug("prompt for call %s, round %s: %s", request.call_id, request.round.value,
                      json.dumps(request.messages, ensure_ascii=False))  # fmt: skip
        return await generate(requests)

    return logged


EngineFactory = Callable[[EngineConfig], Generate]


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
            metrics = self.metrics or default_metrics()
            # a cascade counts its escalations where the detector counts its decisions (bound before the
            # DEBUG wrapper hides it from the detector)
            if (bind_metrics := getattr(engine, "bind_metrics", None)) is not None:
                bind_metrics(metrics)
            if log.isEnabledFor(logging.DEBUG):
                engine = _logging_prompts(engine)
            # one deadline per engine invocation: the tighter of the engine's and the detector's
            timeout = min(engine_config.timeout_s, self.config.detector.engine_timeout_s)
            self.detector = Detector(
                engine,
                policy=policy,
                config=self.config.detector.model_copy(update={"engine_timeout_s": timeout}),
                metrics=metrics,
            )
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

    async def healthy(self) -> bool:
        """Readiness: loaded, not draining, and (with a shared store) the store answers."""
        if not self.ready or self.detector is None:
            return False
        return await self.detector.ready()

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
    """One protocol message {key: "open" | "chunk" | "close" | "resume", ...fields} → its answer (RequestError
    if bad)."""
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
    if kind == "resume":
        resumed = await detector.resume(fields)
        return {key: "resumed", **resumed.to_dict()}
    raise detector.refuse(
        RequestError(
            "invalid_request",
            f"field '{key}' must be open, chunk, close or resume, got {kind!r}",
            field=key,
        )
    )
