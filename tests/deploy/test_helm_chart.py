"""The Helm chart (helm/teleguard): rendered offline with helm-python-sdk (Helm v4) for the default, GPU and
minimal values; linted; every object validated (core kinds with kubernetes-validate --strict, custom resources
against the shared CRD schemas with unknown fields rejected); values.schema.json rejecting bad values; checkov
on the rendered output; the dashboard's and rules' PromQL parsed by promtool and naming only exported metrics.

The rendering, checkov and validation helpers live in tests/support/helm.py (tests/deploy/test_kustomize.py uses them too).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from teleguard.serve.metrics import exported_sample_names
from tests.support.helm import (
    CHART,
    CHART_COPIES,
    NAMESPACE,
    RELEASE,
    ROOT,
    RULES,
    VALUE_SETS,
    by_kind,
    checkov_failures,
    render,
    validation_errors,
    values_of,
    write_manifests,
)

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is a dev dependency: make setup installs it"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a dev dependency"
)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_renders_and_lints_without_errors(name: str) -> None:
    report = helm.lint(CHART, values_of(name), strict=False, namespace=NAMESPACE)
    errors = [m for m in report["messages"] if m["severity"] >= 3] + report["errors"]
    assert not errors, errors
    assert render(values_of(name))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates(name: str) -> None:
    docs = render(values_of(name))
    assert not validation_errors(docs)
    # every object is namespaced explicitly (the detector's namespace or the pipeline profile's)
    assert all(d["metadata"].get("namespace") for d in docs)


def test_value_sets_cover_the_optional_parts() -> None:
    kinds = {name: {d["kind"] for d in render(values_of(name))} for name in VALUE_SETS}
    assert {"InferenceService", "ServingRuntime", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds[
        "default"
    ]
    assert {
        "PodDisruptionBudget",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "StatefulSet",
        "Service",
    } <= kinds["default"]
    assert {"ServiceMonitor", "Job", "Deployment", "Pipeline", "PipelineVersion", "Secret"} <= kinds["gpu"]
    assert kinds["minimal"] == {"InferenceService", "ServingRuntime", "ConfigMap", "ServiceAccount"}


def test_validation_catches_unknown_fields() -> None:
    """The checks above would fail on a misspelt field: both validators are strict."""
    isvc = by_kind(render(), "InferenceService")[0]
    isvc["spec"]["predictor"]["minReplica"] = 1
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "y"}, "dta": {}}
    assert len(validation_errors([isvc, cm])) == 2


# --- the detector's InferenceService ----------------------------------------------------------------------


def test_default_detector_is_a_gpu_standard_deployment_with_storage_from_s3() -> None:
    docs = render()
    [isvc] = by_kind(docs, "InferenceService")
    [runtime] = by_kind(docs, "ServingRuntime")
    [sa] = by_kind(docs, "ServiceAccount")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["storageUri"].startswith("s3://")
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == {"teleguard.io/node-pool": "gpu"}
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    # KServe's storage initializer: the ServiceAccount's Secret and S3 annotations
    assert predictor["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["secrets"] == [{"name": "teleguard-s3"}]
    assert (
        sa["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"]
        == "minio.teleguard.svc.cluster.local:9000"
    )
    assert sa["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"
    assert sa["automountServiceAccountToken"] is False
    [container] = runtime["spec"]["containers"]
    assert container["image"] == "ghcr.io/teleguard/teleguard-server:0.1.0"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading takes minutes
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/etc/teleguard"] == "config"


def test_serve_config_is_a_valid_server_configuration() -> None:
    from teleguard.serve.server import ServeConfig

    for name in VALUE_SETS:
        [cm] = [d for d in render(values_of(name)) if d["metadata"]["name"].endswith("-serve")]
        config = ServeConfig.model_validate(yaml.safe_load(cm["data"]["serve.yaml"]))
        assert (config.host, config.port, config.model) == ("0.0.0.0", 8080, "/mnt/models")
    gpu = yaml.safe_load(
        next(d for d in render(values_of("gpu")) if d["metadata"]["name"].endswith("-serve"))["data"][
            "serve.yaml"
        ]
    )
    assert gpu["engine"]["kind"] == "vllm" and gpu["engine"]["engine_options"]["tensor_parallel_size"] == 2


def test_autoscaling_modes() -> None:
    keda = by_kind(render(values_of("gpu")), "InferenceService")[0]
    assert keda["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    [metric] = keda["spec"]["predictor"]["autoScaling"]["metrics"]
    assert metric["external"]["metric"]["backend"] == "prometheus"
    assert "teleguard_active_calls" in metric["external"]["metric"]["query"]
    hpa = by_kind(render(), "InferenceService")[0]
    assert hpa["spec"]["predictor"]["autoScaling"]["metrics"][0]["resource"]["name"] == "cpu"
    knative = by_kind(render(values_of("minimal")), "InferenceService")[0]
    assert knative["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert "autoScaling" not in knative["spec"]["predictor"]
    assert "nvidia.com/gpu" not in knative["spec"]["predictor"]["model"]["resources"]["limits"]


def test_pod_security_everywhere() -> None:
    for name in VALUE_SETS:
        docs = render(values_of(name))
        pods = [d["spec"]["predictor"] for d in by_kind(docs, "InferenceService")]
        pods += [
            d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")
        ]
        containers = [c for d in by_kind(docs, "ServingRuntime") for c in d["spec"]["containers"]]
        containers += [
            c
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job")
            for c in d["spec"]["template"]["spec"]["containers"]
        ]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
        for c in containers:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["runAsUser"] >= 10000


def test_rbac_is_least_privilege() -> None:
    docs = render(values_of("gpu"))
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in by_kind(docs, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
            assert "secrets" not in rule["resources"]


def test_network_policy_and_pdb_select_the_detector_pods() -> None:
    docs = render()
    [isvc] = by_kind(docs, "InferenceService")
    selector = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    [policy] = [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-detector")]
    [pdb] = by_kind(docs, "PodDisruptionBudget")
    [monitor] = by_kind(docs, "PodMonitor")
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    assert monitor["spec"]["podMetricsEndpoints"][0] == {
        "port": "http1",
        "path": "/metrics",
        "interval": "15s",
    }


# --- the session store ---------------------------------------------------------------------------------------


def store_env(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    [runtime] = by_kind(docs, "ServingRuntime")
    env = {e["name"]: e for e in runtime["spec"]["containers"][0]["env"]}
    return env.get("TELEGUARD_SESSION_STORE")


def test_default_session_store_is_the_charts_own_redis_reached_only_by_the_detector() -> None:
    from teleguard.serve.detector import DetectorConfig

    docs = render()
    [redis] = by_kind(docs, "StatefulSet")
    [service] = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "teleguard-redis"]
    assert redis["spec"]["serviceName"] == service["metadata"]["name"] and redis["spec"]["replicas"] == 1
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert (
        args[args.index("--maxmemory-policy") + 1] == "noeviction"
        and args[args.index("--appendonly") + 1] == "no"
    )
    # the detector's --session-store (its environment variable) names that Service; the store settings are in
    # serve.yaml
    env = store_env(docs)
    assert env == {"name": "TELEGUARD_SESSION_STORE", "value": "redis://teleguard-redis:6379/0"}
    assert DetectorConfig(session_store=env["value"]).session_store == env["value"]
    [cm] = [d for d in docs if d["metadata"]["name"].endswith("-serve")]
    store = yaml.safe_load(cm["data"]["serve.yaml"])["detector"]["store"]
    assert store == {"key_prefix": "teleguard", "lease_seconds": 5, "timeout_s": 1}
    # NetworkPolicies: only the detector pods reach Redis, which reaches nothing; the detector may reach it
    policies = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "NetworkPolicy")}
    own = policies["teleguard-redis"]
    assert own["podSelector"]["matchLabels"].items() <= pod_labels.items() and own["egress"] == []
    [ingress] = own["ingress"]
    predictor = {"serving.kserve.io/inferenceservice": "teleguard", "component": "predictor"}
    assert ingress["from"] == [{"podSelector": {"matchLabels": predictor}}]
    assert ingress["ports"] == [{"port": 6379, "protocol": "TCP"}]
    egress = policies["teleguard-detector"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": own["podSelector"]["matchLabels"]}}],
            "ports": [{"port": 6379, "protocol": "TCP"}]} in egress  # fmt: skip
    # persistence on (the GPU values): an append-only file on a claim
    [gpu] = by_kind(render(values_of("gpu")), "StatefulSet")
    assert gpu["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert "--appendonly" in gpu["spec"]["template"]["spec"]["containers"][0]["args"]


def test_an_existing_redis_through_a_secret() -> None:
    values = {
        "serving": {"sessionStore": {"type": "redis", "existingSecret": "shared-redis", "secretKey": "uri"}},
        "networkPolicy": {"redisNamespaces": ["data"], "redisPort": 6380},
    }
    docs = render(values)
    assert not by_kind(docs, "StatefulSet")
    assert store_env(docs) == {
        "name": "TELEGUARD_SESSION_STORE",
        "valueFrom": {"secretKeyRef": {"name": "shared-redis", "key": "uri"}},
    }
    [policy] = by_kind(docs, "NetworkPolicy")
    assert {"to": [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}}}],
            "ports": [{"port": 6380, "protocol": "TCP"}]} in policy["spec"]["egress"]  # fmt: skip
    assert not validation_errors(docs)


def test_the_in_memory_store_is_for_one_replica_only() -> None:
    one = render({"serving": {"sessionStore": {"type": "memory"}, "maxReplicas": 1}})
    assert store_env(one) is None and not by_kind(one, "StatefulSet")
    [cm] = [d for d in one if d["metadata"]["name"].endswith("-serve")]
    assert "detector" not in yaml.safe_load(cm["data"]["serve.yaml"]) or "store" not in yaml.safe_load(
        cm["data"]["serve.yaml"]
    ).get("detector", {})
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="keeps each call in one pod"):
        chart.render({"serving": {"sessionStore": {"type": "memory"}}}, name=RELEASE, namespace=NAMESPACE)


def test_kfp_launcher_and_storage_config_match_the_manifests() -> None:
    docs = {d["metadata"]["name"]: d for d in render() if d["kind"] == "ConfigMap"}
    manifest = yaml.safe_load((ROOT / "manifests" / "kfp-launcher-minio.yaml").read_text("utf-8"))
    assert docs["kfp-launcher"]["data"] == manifest["data"]
    storage = yaml.safe_load((ROOT / "manifests" / "teleguard-storage.yaml").read_text("utf-8"))
    assert docs["teleguard-storage"]["data"] == storage["data"]


def test_pipeline_upload_job_and_resources() -> None:
    docs = render(values_of("gpu"))
    [job] = by_kind(docs, "Job")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/teleguard/teleguard-trainer:")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    [cm] = [
        d for d in docs if d["metadata"]["name"].endswith("-pipeline-upload") and d["kind"] == "ConfigMap"
    ]
    assert cm["data"]["safe_qaq.yaml"] == (
        ROOT / "pipelines" / "compiled" / "safe_qaq.yaml"
    ).read_text().rstrip("\n")
    compile(cm["data"]["upload.py"], "upload.py", "exec")
    [pipeline] = by_kind(docs, "Pipeline")
    assert pipeline["metadata"]["namespace"] == "kubeflow-user-example-com"


# --- values.schema.json --------------------------------------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"serving": {"gpus": 1}},
    "gpu count as a string": {"serving": {"gpu": {"count": "1"}}},
    "engine outside the set": {"serving": {"engine": "tgi"}},
    "deployment mode outside the set": {"serving": {"deploymentMode": "Serverless"}},
    "autoscaling mode outside the set": {"serving": {"autoscaling": {"mode": "vpa"}}},
    "replicas as a string": {"serving": {"minReplicas": "1"}},
    "storage URI without a scheme": {"serving": {"storageUri": "teleguard/model"}},
    "endpoint with a scheme": {"storage": {"endpoint": "http://minio:9000"}},
    "useHttps as a string": {"storage": {"useHttps": "false"}},
    "root containers": {"securityContext": {"runAsNonRoot": False}},
    "writable root filesystem": {"securityContext": {"readOnlyRootFilesystem": False}},
    "bad interval": {"monitoring": {"podMonitor": {"interval": "fast"}}},
    "resource quantity nonsense": {"serving": {"resources": {"limits": {"cpu": "lots"}}}},
    "bad digest": {"image": {"digest": "latest"}},
    "labels with a number value": {"commonLabels": {"team": 1}},
    "namespace list with a bad name": {"networkPolicy": {"ingressNamespaces": ["Bad_Name"]}},
    "session store outside the set": {"serving": {"sessionStore": {"type": "etcd"}}},
    "session store secret with a bad name": {
        "serving": {"sessionStore": {"type": "redis", "existingSecret": "A B"}}
    },
    "redis memory without a unit": {"redis": {"maxMemory": "1024"}},
    "redis persistence as a string": {"redis": {"persistence": {"enabled": "yes"}}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_values_schema_accepts_the_value_sets() -> None:
    chart = helm.Chart.load(CHART)
    for name in VALUE_SETS:
        chart.validate_schema(values_of(name))


def test_values_yaml_is_documented_line_by_line() -> None:
    """Every key in values.yaml has a comment on the line(s) above it or a comment above its parent block."""
    lines = (CHART / "values.yaml").read_text("utf-8").splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z][\w.-]*:", line):
            continue
        indent = len(line) - len(line.lstrip())
        prev = lines[i - 1].strip() if i else ""
        parent_documented = any(
            lines[j].strip().startswith("#") and len(lines[j]) - len(lines[j].lstrip()) < indent
            for j in range(i)
        )
        if not prev.startswith("#") and not (indent and parent_documented) and not prev.endswith(":"):
            undocumented.append(line)
    assert not undocumented


# --- monitoring: rules, dashboard, PromQL ----------------------------------------------------------------------


@pytest.mark.parametrize("copy", CHART_COPIES, ids=lambda p: p.name)
def test_chart_copies_are_identical_to_their_sources(copy: Path) -> None:
    source = CHART_COPIES[copy]
    assert copy.read_bytes() == source.read_bytes(), (
        f"stale copy: cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )


def test_prometheusrule_carries_exactly_the_promtool_tested_rules() -> None:
    [rule] = by_kind(render(), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text("utf-8"))["groups"]


def dashboard_exprs() -> list[str]:
    [cm] = [d for d in render() if d["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(cm["data"]["teleguard.json"])
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_dashboard_has_the_panels() -> None:
    dashboard = json.loads((CHART / "files" / "dashboards" / "teleguard.json").read_text("utf-8"))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in (
        "fraud rate",
        "fraud type",
        "latency",
        "time to detection",
        "active calls",
        "tokens",
        "errors",
    ):
        assert word in titles
    latency = " ".join(
        t["expr"] for p in dashboard["panels"] if p["title"] == "Decision latency" for t in p["targets"]
    )
    assert all(q in latency for q in ("p50", "p95", "p99"))


PROMQL_WORDS = {
    "sum", "rate", "increase", "histogram_quantile", "by", "without", "on", "ignoring", "and", "or", "unless",
    "avg", "max", "min", "count", "le", "group_left", "group_right", "offset", "bool", "irate", "delta",
    "clamp_min", "clamp_max", "abs", "topk", "bottomk", "label_replace", "vector", "scalar", "time",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers outside strings, matchers and groupings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+[a-z]*|e", n)}


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text("utf-8"))["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    allowed = exported_sample_names() | recorded
    exprs = dashboard_exprs() + [r["expr"] for g in groups for r in g["rules"]]
    unknown = {name for expr in exprs for name in metric_names(expr)} - allowed
    assert not unknown
    assert metric_names("sum by (le) (rate(foo_bucket{le=~'3'}[5m])) / on () bar") == {"foo_bucket", "bar"}


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is missing"
)
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert subprocess.run(["promtool", "check", "rules", str(bad)], capture_output=True).returncode != 0


# --- checkov ---------------------------------------------------------------------------------------------------


def test_checkov_passes_on_every_value_set(tmp_path: Path) -> None:
    for name in VALUE_SETS:
        write_manifests(render(values_of(name)), tmp_path / name)
    failed, skipped = checkov_failures(tmp_path)
    assert not failed
    # every skip is an annotation in the chart with its reason
    for check in skipped:
        assert len(check.get("suppress_comment", "")) > 20, check["check_id"]
