"""A counting HTTP proxy on loopback, in front of a real judge server (`swift deploy`).

It forwards every request to the upstream server and records it (method, path, headers, body), so tests
can count the requests that reached the server and see what the client sent. Rules inject failures into
chosen requests: a delay before forwarding (to provoke client timeouts) or an immediate error status (a 503
with Retry-After, a 400...) instead of forwarding.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Rule:
    """Applies to requests whose body contains `match` (any request if empty), `times` times (None: always)."""

    match: bytes = b""
    times: int | None = 1
    delay_s: float = 0.0  # sleep before forwarding
    status: int | None = None  # answer this status instead of forwarding
    retry_after: str | None = None
    body: bytes = b'{"error": "injected by the test proxy"}'
    echo_authorization: bool = False  # put the request's Authorization header into the error body
    hits: int = 0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    forwarded: bool = False
    at: float = field(default_factory=time.monotonic)


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.requests: list[Seen] = []
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- control

    def start(self) -> CountingProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.rules.clear()

    def add_rule(self, **kwargs: object) -> Rule:
        rule = Rule(**kwargs)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def chat_requests(self, forwarded_only: bool = True) -> list[Seen]:
        """Chat-completion requests received (by default only those that reached the server)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.endswith("/chat/completions") and (r.forwarded or not forwarded_only)
            ]

    @property
    def forwarded(self) -> int:
        return len(self.chat_requests())

    # --- serving

    def _rule_for(self, body: bytes) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.match in body and (rule.times is None or rule.hits < rule.times):
                    rule.hits += 1
                    return rule
        return None

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            send = {
                k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")
            }
            send["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=send)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type") or "application/json", response.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = Seen(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with proxy._lock:
                    proxy.requests.append(seen)
                rule = proxy._rule_for(body) if method == "POST" else None
                extra: dict[str, str] = {}
                if rule is not None and rule.delay_s:
                    time.sleep(rule.delay_s)
                if rule is not None and rule.status is not None:
                    status, ctype, data = rule.status, "application/json", rule.body
                    if rule.echo_authorization:
                        data += b" " + seen.headers.get("authorization", "").encode()
                    if rule.retry_after is not None:
                        extra["Retry-After"] = rule.retry_after
                else:
                    seen.forwarded = True
                    status, ctype, data = proxy._forward(method, self.path, seen.headers, body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass

        return Handler
