"""A stand-in for the Kubeflow Pipelines API server (REST v2beta1) on loopback.

No KFP backend runs here, so `teleguard pipeline submit` is tested against this: the real kfp.Client talks
HTTP to it. It implements only the routes submit uses, keeps what it was sent, and checks the bearer token.
"""

from __future__ import annotations

import json
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from tests.support.loopback_api import LoopbackApi

API = "/apis/v2beta1"


class FakeKfpApi(LoopbackApi):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.specs: dict[str, bytes] = {}  # version id -> uploaded file
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.uploads = 0
        self.unauthorized = 0

    def __enter__(self) -> FakeKfpApi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ model
    def _add_version(self, pipeline_id: str, name: str, spec: bytes) -> dict[str, Any]:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": uuid.uuid4().hex, "display_name": name}
        self.versions.setdefault(pipeline_id, []).append(version)
        self.specs[version["pipeline_version_id"]] = spec
        self.uploads += 1
        return version

    @staticmethod
    def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
        if not filter_json:
            return True
        return all(item.get(p["key"]) == p.get("stringValue") for p in json.loads(filter_json)["predicates"])

    def route(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any]:
        # healthz stays open so a refused token fails on the first real call, not after the client's five
        # health-check retries
        if headers.get("Authorization") != f"Bearer {self.token}" and path != f"{API}/healthz":
            self.unauthorized += 1
            return 401, {"error": "missing or wrong bearer token"}
        return 200, self._answer(method, path, query, body, headers.get("Content-Type", ""))

    def _answer(self, method: str, path: str, query: dict[str, str], body: bytes, content_type: str) -> Any:
        if (method, path) == ("GET", f"{API}/healthz"):
            return {"multi_user": False}
        if (method, path) == ("GET", f"{API}/pipelines"):
            found = [p for p in self.pipelines.values() if self._matches(p, query.get("filter"))]
            return {"pipelines": found or None, "total_size": len(found)}
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            pipeline = {"pipeline_id": uuid.uuid4().hex, "display_name": query["name"]}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], query["name"], _uploaded_file(body, content_type))
            return pipeline
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            return self._add_version(query["pipelineid"], query["name"], _uploaded_file(body, content_type))
        if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[-2]
            return {"pipeline_versions": self.versions.get(pipeline_id), "total_size": 1}
        if (method, path) == ("GET", f"{API}/experiments"):
            found = [e for e in self.experiments.values() if self._matches(e, query.get("filter"))]
            return {"experiments": found or None, "total_size": len(found)}
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {**json.loads(body), "experiment_id": uuid.uuid4().hex}
            self.experiments[experiment["experiment_id"]] = experiment
            return experiment
        if (method, path) == ("POST", f"{API}/runs"):
            run = {**json.loads(body), "run_id": uuid.uuid4().hex, "state": "PENDING"}
            self.runs.append(run)
            return run
        raise KeyError(f"{method} {path}")


def _uploaded_file(body: bytes, content_type: str) -> bytes:
    """The `uploadfile` part of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise KeyError("uploadfile part")
