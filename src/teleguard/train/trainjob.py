"""A training stage on several GPU nodes: a Kubeflow Trainer TrainJob launched and followed from a pipeline step.

The step (one pod) cannot span nodes itself, so it creates a TrainJob (trainer.kubeflow.org/v1alpha1) whose
every node runs `teleguard train <stage>` from the same image. Inputs and outputs travel through S3/MinIO URIs:
the nodes read the step's input artifacts where KFP stored them and node 0 uploads the stage folder, which the
step then downloads as its output artifact. The torch runtime sets PET_NNODES / PET_NODE_RANK / PET_MASTER_*
on every node; `teleguard.train.distributed` hands them to ms-swift's launcher.

The step follows node 0's log and the job's conditions, and fails with the job's own error message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# JobSet (which runs a TrainJob's pods) labels every pod with the job's name and its replicated job
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
PATCH_MANAGER = "teleguard.io/pipeline"
NODE_JOB = "node"  # the torch runtimes' replicated job (and container) that runs the trainer


class TrainJobError(RuntimeError):
    """The TrainJob failed, was not accepted, or did not finish in time."""


class TrainJobSettings(BaseModel):
    """Where and how the nodes run; every field maps to the TrainJob spec."""

    model_config = ConfigDict(extra="forbid")

    namespace: str
    image: str
    num_nodes: int = Field(ge=2)
    runtime: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    gpu_type: str = "nvidia.com/gpu"
    gpus_per_node: int = Field(default=1, ge=0)
    cpu_request: str = "8"
    memory_request: str = "64Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    shm_size: str = "16Gi"
    env: dict[str, str] = Field(default_factory=dict)
    # Secret / ConfigMap the nodes read S3 settings from (the same ones the pipeline steps use)
    s3_secret: str | None = "teleguard-minio"
    s3_config_map: str | None = "teleguard-storage"
    timeout_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    poll_seconds: float = Field(default=15.0, gt=0)


def s3_env(settings: TrainJobSettings) -> list[dict[str, Any]]:
    """S3 endpoint and keys as references, so no credential is written into the TrainJob."""
    env: list[dict[str, Any]] = []
    if settings.s3_config_map:
        ref = {"name": settings.s3_config_map, "key": "endpoint", "optional": True}
        env.append({"name": "S3_ENDPOINT", "valueFrom": {"configMapKeyRef": ref}})
    if settings.s3_secret:
        for key, name in (("accesskey", "AWS_ACCESS_KEY_ID"), ("secretkey", "AWS_SECRET_ACCESS_KEY")):
            env.append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}}
            )
    return env


def trainjob_manifest(name: str, command: list[str], settings: TrainJobSettings) -> dict[str, Any]:
    """The TrainJob resource: the trainer (image, command, nodes, GPUs) and a runtime patch for the pod
    placement the runtime cannot know (GPU pool selector, tolerations, memory-backed /dev/shm)."""
    resources: dict[str, Any] = {"requests": {"cpu": settings.cpu_request, "memory": settings.memory_request}}
    if settings.gpus_per_node:
        resources["limits"] = {settings.gpu_type: str(settings.gpus_per_node)}
    env = [{"name": k, "value": v} for k, v in settings.env.items()] + s3_env(settings)
    pod_spec: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
        "containers": [{"name": NODE_JOB, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = settings.node_selector
    if settings.tolerations:
        pod_spec["tolerations"] = settings.tolerations
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/part-of": "teleguard", "app.kubernetes.io/component": "training"},
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": settings.runtime_kind, "name": settings.runtime},
            "trainer": {
                "image": settings.image,
                "command": command,
                "env": env,
                "numNodes": settings.num_nodes,
                "resourcesPerNode": resources,
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod_spec}}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def stage_command(
    stage: str, recipe: str, overrides: dict[str, Any], *, datasets: str, start_model: str, output_dir: str
) -> list[str]:
    """`teleguard train <stage>` on the step's inputs; overrides travel as --set with JSON values (YAML reads
    them back unchanged)."""
    sets = {
        **overrides,
        "data.datasets": datasets,
        "output_dir": output_dir,
        f"stages.{stage}.enabled": True,
    }
    command = ["teleguard", "train", stage, "--config", recipe, "--start-model", start_model]
    for key, value in sets.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def _condition(status: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


class TrainJobRunner:
    """Creates a TrainJob and follows it to the end through the Kubernetes API."""

    def __init__(self, api_client: Any = None, log: Callable[[str], None] = print) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()  # the pipeline step's service account
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.log = log

    def run(self, manifest: dict[str, Any], settings: TrainJobSettings) -> dict[str, Any]:
        """Create the job, stream node 0's log, and return its final status; TrainJobError on failure."""
        from kubernetes.client.exceptions import ApiException

        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        except ApiException as err:
            raise TrainJobError(
                f"TrainJob {namespace}/{name} was not accepted: {err.status} {err.body}"
            ) from None
        self.log(f"TrainJob {namespace}/{name}: {settings.num_nodes} nodes x {settings.gpus_per_node} GPUs")
        deadline = time.monotonic() + settings.timeout_seconds
        printed = 0
        while True:
            job = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            printed = self._print_new_log(namespace, name, printed)
            status = job.get("status")
            if failed := _condition(status, "Failed"):
                raise TrainJobError(
                    f"TrainJob {namespace}/{name} failed: {failed.get('reason', '')}: {failed.get('message', '')}"
                )
            if _condition(status, "Complete"):
                self.log(f"TrainJob {namespace}/{name} complete")
                return status
            if time.monotonic() > deadline:
                raise TrainJobError(
                    f"TrainJob {namespace}/{name} did not finish in {settings.timeout_seconds} s"
                )
            time.sleep(settings.poll_seconds)

    def _print_new_log(self, namespace: str, name: str, printed: int) -> int:
        """Node 0's log lines not printed yet (the pod may not exist yet, or be gone)."""
        from kubernetes.client.exceptions import ApiException

        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items
        pods = sorted(pods, key=lambda p: p.metadata.name)
        if not pods:
            return printed
        try:
            text = self.core.read_namespaced_pod_log(pods[0].metadata.name, namespace, container=NODE_JOB)
        except ApiException:
            return printed  # container not started yet
        lines = text.splitlines()
        for line in lines[printed:]:
            self.log(f"[{pods[0].metadata.name}] {line}")
        return max(printed, len(lines))


def current_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (a pipeline step's profile namespace)."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            return f.read().strip() or default
    except OSError:
        return default
