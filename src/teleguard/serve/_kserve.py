"""KServe's classes, imported once for the detector's modules.

kserve.model_server parses sys.argv with argparse when imported (ModelServer's flags, abbreviations allowed):
`teleguard serve --timeout 2.5` would be read as its int --timeout-keep-alive and exit. It sees no arguments.
"""

from __future__ import annotations

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import Model
    from kserve.errors import ModelNotReady, ServerNotReady
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer, metrics_handler
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "Model",
    "ModelNotReady",
    "ModelRepository",
    "ModelRepositoryExtension",
    "RESTServer",
    "ServerNotReady",
    "metrics_handler",
    "register_v1_endpoints",
    "register_v2_endpoints",
]
