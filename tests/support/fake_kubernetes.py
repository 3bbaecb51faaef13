"""A stand-in for the Kubernetes API with Kubeflow Trainer, on loopback: just what a TrainJob launcher uses.

No cluster runs here. The real kubernetes client talks HTTP to this server; a created TrainJob "runs" as
node 0 would: its trainer command as a local process, with the env the runtime would give it (Secret and
ConfigMap references resolved, PET_* launcher variables for one node). The process output is node 0's pod log;
its exit status becomes the job's Complete or Failed condition.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.support.loopback_api import LoopbackApi


class FakeKubernetes(LoopbackApi):
    def __init__(self, secrets: dict[str, dict[str, str]], config_maps: dict[str, dict[str, str]]) -> None:
        super().__init__()
        self.secrets, self.config_maps = secrets, config_maps
        self.trainjobs: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeKubernetes:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self._threads:
            thread.join(timeout=600)
        self.stop()

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration(host=self.url)
        return client.ApiClient(configuration)

    # ------------------------------------------------------------------------------------ running a job
    def _env(self, entries: list[dict[str, Any]]) -> dict[str, str]:
        env = {}
        for entry in entries:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            source = entry["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[entry["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                ref = source["configMapKeyRef"]
                env[entry["name"]] = self.config_maps[ref["name"]][ref["key"]]
        return env

    def _run(self, name: str, job: dict[str, Any]) -> None:
        trainer = job["spec"]["trainer"]
        command = list(trainer["command"])
        # the image's entry point is this environment's console script
        command[0] = shutil.which(command[0], path=str(Path(sys.executable).parent)) or command[0]
        env = {**os.environ, **self._env(trainer.get("env", [])), "PET_NNODES": "1", "PET_NODE_RANK": "0"}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            self.logs[name] = self.logs.get(name, "") + line
        code = proc.wait()
        last = (self.logs.get(name) or "").strip().splitlines()[-1:] or [""]
        condition = (
            {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "jobs completed"}
            if code == 0
            else {"type": "Failed", "status": "True", "reason": "TrainerFailed", "message": last[0]}
        )
        job["status"] = {"conditions": [condition]}

    # ------------------------------------------------------------------------------------------ routes
    def route(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if method == "POST" and path.endswith("/trainjobs"):
            job = json.loads(body)
            name = job["metadata"]["name"]
            if name in self.trainjobs:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "message": f"{name} exists"}
            self.trainjobs[name] = job
            thread = threading.Thread(target=self._run, args=(name, job), daemon=True)
            self._threads.append(thread)
            thread.start()
            return 201, job
        if method == "GET" and "trainjobs" in parts:
            return 200, self.trainjobs[parts[-1]]
        if method == "GET" and path.endswith("/pods"):
            name = query.get("labelSelector", "").split("=")[-1]
            pods = [] if name not in self.trainjobs else [{"metadata": {"name": f"{name}-node-0-0-x7k2p"}}]
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": pods}
        if method == "GET" and path.endswith("/log"):
            name = parts[-2].removesuffix("-node-0-0-x7k2p")
            return 200, self.logs.get(name, "")
        return 404, {"kind": "Status", "reason": "NotFound", "message": f"{method} {path}"}
