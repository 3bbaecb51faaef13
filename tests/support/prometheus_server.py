"""Test helpers: a real Prometheus server on loopback and a metrics endpoint for it to scrape.

`PrometheusServer` runs the `prometheus` binary (Debian package `prometheus`) with its storage in a temporary
folder, scraping the given loopback targets every second and evaluating the given rule files every second;
`query(expr)` / `value(expr)` ask its HTTP API. `MetricsEndpoint` serves a prometheus_client registry on
127.0.0.1 so a test can drive metrics it knows the values of. Both only ever bind 127.0.0.1.
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, start_http_server

from teleguard.loopback import free_port
from tests.support.paths import REPO

RULES_FILE = REPO / "monitoring" / "prometheus" / "rules.yaml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
LOOPBACK = "127.0.0.1"


class MetricsEndpoint:
    """Serves one registry's /metrics on 127.0.0.1 (an OS-chosen port) for the life of the context."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.port = 0
        self._server: Any = None
        self._thread: Any = None

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> MetricsEndpoint:
        self._server, self._thread = start_http_server(0, addr=LOOPBACK, registry=self.registry)
        self.port = int(self._server.server_port)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """A `prometheus` process scraping `targets` (host:port on loopback) with `rule_files` loaded."""

    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        *,
        rule_files: Sequence[Path] = (),
        job: str = "teleguard",
        metrics_path: str = "/metrics",
        interval: str = "1s",
        startup_timeout: float = 30.0,
        binary: str | None = None,
    ) -> None:
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.interval = interval
        self.startup_timeout = startup_timeout
        self.binary = binary or PROMETHEUS
        self.port = 0
        self.log_path = self.workdir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.interval,
                "scrape_timeout": self.interval,
                "evaluation_interval": self.interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def __enter__(self) -> PrometheusServer:
        if self.binary is None:
            raise PrometheusError("the prometheus binary is not installed (Debian package 'prometheus')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        # The free port can be taken between choosing and binding it: try a few.
        for _attempt in range(3):
            self.port = free_port()
            if self._start(config_path):
                return self
            if "address already in use" not in self.log().lower():
                break
        raise PrometheusError(f"prometheus did not become ready; its log:\n{self.log()[-4000:]}")

    def _start(self, config_path: Path) -> bool:
        storage = self.workdir / f"data-{self.port}"
        command = [
            str(self.binary),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self._stop()
        return False

    def _stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, PrometheusError otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # a bad query answers 400 with an error body
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [ts, "1.5"]}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that gives at most one sample (None when it gives none)."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} gave {len(result)} samples, expected at most one")
        return float(result[0]["value"][1]) if result else None

    def wait_for(
        self, expr: str, predicate: Callable[[float | None], bool], *, timeout: float = 60.0
    ) -> float | None:
        """Polls `value(expr)` until `predicate` holds; fails with the last value seen. The default wait is
        generous for a slow machine; a wait that succeeds returns as soon as the value holds."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while True:
            last = self.value(expr)
            if predicate(last):
                return last
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr!r} is still {last} after {timeout} s")
            time.sleep(0.25)

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]


def bucket_quantile(q: float, observations: Sequence[float], bounds: Sequence[float]) -> float:
    """What histogram_quantile computes from these observations' buckets (linear within a bucket)."""
    cumulative = [sum(1 for x in observations if x <= bound) for bound in bounds]
    rank = q * len(observations)
    index = next(i for i, count in enumerate(cumulative) if count >= rank)
    lower = bounds[index - 1] if index else 0.0
    below = cumulative[index - 1] if index else 0
    return lower + (bounds[index] - lower) * (rank - below) / (cumulative[index] - below)


def bucket_of(value: float, bounds: Sequence[float]) -> tuple[float, float]:
    """The (lower, upper] bucket holding a value: the resolution a histogram quantile has."""
    index = bisect.bisect_left(bounds, value)
    return (bounds[index - 1] if index else 0.0, bounds[index])


def sample_quantile(q: float, observations: Sequence[float]) -> float:
    ordered = sorted(observations)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def close_to(expected: float) -> Callable[[float | None], bool]:
    # Rates are extrapolated by the same factor for every series of one scrape, so ratios and quantiles come
    # back exact up to float rounding.
    return lambda value: value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)
