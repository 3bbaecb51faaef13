"""A small HTTP API server on loopback for stand-ins of services that cannot run here (a KFP backend, a
Kubernetes API). A subclass implements `route`; this class serves it on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class LoopbackApi:
    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def route(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any]:
        """(status, payload): a str payload is sent as text/plain, anything else as JSON."""
        raise NotImplementedError

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    status, payload = api.route(method, url.path, query, body, self.headers)
                except KeyError as err:
                    status, payload = 404, {"error": f"not found: {err}"}
                text = isinstance(payload, str)
                data = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass  # keep test output readable

        return Handler
