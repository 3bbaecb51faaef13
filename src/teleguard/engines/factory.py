"""The one way to build a serving engine from its configuration (`EngineConfig.kind`, `EngineConfig.cascade`).

Each backend is imported only when it is chosen: ms-swift (and vLLM) for a local engine, httpx for a remote
one; a cascade builds its two engines the same way. Local engines load their model here: call `build_engine`
off the event loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from teleguard.engines.cascade import CascadeEngine, CascadeMetrics
from teleguard.engines.contract import CascadeConfig, EngineConfig

if TYPE_CHECKING:
    from teleguard.engines.remote import RemoteEngine
    from teleguard.engines.swift import SwiftServingEngine

log = logging.getLogger(__name__)


def build_engine(
    config: EngineConfig, *, metrics: CascadeMetrics | None = None
) -> SwiftServingEngine | RemoteEngine | CascadeEngine:
    """The engine the configuration names.

    With `config.cascade` set, a `CascadeEngine` over the small engine (this config without its cascade) and
    the large one; it counts its escalations in `metrics` (or, unless given, in the metrics a detector binds
    with `CascadeEngine.bind_metrics`).
    """
    if config.cascade is not None:
        return build_cascade(config, metrics=metrics)
    if config.kind == "remote":
        from teleguard.engines.remote import RemoteEngine

        return RemoteEngine(config)
    from teleguard.engines.swift import SwiftServingEngine  # ms-swift; vLLM only for kind vllm

    return SwiftServingEngine(config)


def _large_config(config: EngineConfig) -> EngineConfig:
    """The large engine's configuration with an s3:// or minio:// model copied to a local folder."""
    if config.kind != "remote" and config.model and config.model.startswith(("s3://", "minio://")):
        from teleguard.storage import resolve_model

        return config.model_copy(update={"model": str(resolve_model(config.model))})
    return config


def build_cascade(config: EngineConfig, *, metrics: CascadeMetrics | None = None) -> CascadeEngine:
    """The cascade `config.cascade` describes around the engine `config` names (loads both models)."""
    cascade: CascadeConfig | None = config.cascade
    if cascade is None:
        raise ValueError("build_cascade needs an EngineConfig with 'cascade' set")
    large_config = _large_config(cascade.large)
    small: Any = build_engine(config.model_copy(update={"cascade": None}))
    large: Any = build_engine(large_config)
    log.info(
        "confidence cascade: %s engine first, %s engine (%s) below confidence %.2f",
        config.kind,
        large_config.kind,
        large_config.url or large_config.model,
        cascade.threshold,
    )
    return CascadeEngine(
        small, large, threshold=cascade.threshold, large_timeout_s=large_config.timeout_s, metrics=metrics
    )
