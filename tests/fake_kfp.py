"""A stand-in for the Kubeflow Pipelines API server (REST v2beta1) on loopback.

No KFP backend runs here, so `teleguard pipeline submit` is tested against this: the real kfp.Client talks
HTTP to it. It implements only the routes submit uses, keeps what it was sent, and checks the bearer token.
"""

from __future__ import annotations

import json
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


class FakeKfpApi:
    def __init__(self, token: str) -> None:
        self.token = token
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.specs: dict[str, bytes] = {}  # version id -> uploaded file
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.uploads = 0
        self.unauthorized = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeKfpApi:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

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

    def route(self, method: str, path: str, query: dict[str, str], body: bytes, content_type: str) -> Any:
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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                # healthz stays open so a refused token fails on the first real call, not after the
                # client's five health-check retries
                authorized = self.headers.get("Authorization") == f"Bearer {api.token}"
                if not authorized and url.path != f"{API}/healthz":
                    api.unauthorized += 1
                    return self._reply(401, {"error": "missing or wrong bearer token"})
                try:
                    result = api.route(method, url.path, query, body, self.headers.get("Content-Type", ""))
                except KeyError as err:
                    return self._reply(404, {"error": f"no route {err}"})
                self._reply(200, result)

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _uploaded_file(body: bytes, content_type: str) -> bytes:
    """The `uploadfile` part of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise KeyError("uploadfile part")
