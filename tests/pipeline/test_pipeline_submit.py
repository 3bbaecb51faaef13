"""`teleguard pipeline submit` with the real kfp.Client against a KFP API stand-in on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from teleguard.cli import app
from teleguard.pipeline.cluster import kubeconfig_token, submit
from teleguard.pipeline.registry import COMPILED_DIR, SPEC_FILE
from tests.support.fake_kfp import FakeKfpApi

TOKEN = "tg-kfp-token-3f9a"


@pytest.fixture
def kfp_api(monkeypatch: pytest.MonkeyPatch) -> FakeKfpApi:
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    with FakeKfpApi(TOKEN) as api:
        yield api


def test_submit_uploads_once_then_reuses_and_versions_a_changed_spec(
    kfp_api: FakeKfpApi, tmp_path: Path
) -> None:
    arguments = {"data_uri": "s3://teleguard/data/calls", "gpu_count": 8}
    first = submit(kfp_api.url, arguments, token=TOKEN)
    assert kfp_api.uploads == 1 and len(kfp_api.pipelines) == 1
    [version] = next(iter(kfp_api.versions.values()))
    assert kfp_api.specs[version["pipeline_version_id"]] == (COMPILED_DIR / SPEC_FILE).read_bytes()
    run = kfp_api.runs[0]
    assert run["run_id"] == first
    assert run["runtime_config"]["parameters"] == arguments
    assert run["pipeline_version_reference"]["pipeline_version_id"] == version["pipeline_version_id"]
    assert kfp_api.experiments[run["experiment_id"]]["display_name"] == "teleguard"

    # The first version carries the pipeline's name (the server names it), so the next submission adds the
    # version named by the spec's hash once; from then on the same spec is reused.
    submit(kfp_api.url, arguments, token=TOKEN)
    submit(kfp_api.url, arguments, token=TOKEN)
    assert kfp_api.uploads == 2 and len(kfp_api.experiments) == 1 and len(kfp_api.runs) == 3
    assert kfp_api.runs[1]["pipeline_version_reference"] == kfp_api.runs[2]["pipeline_version_reference"]

    # a changed spec: a new version of the same pipeline, and the run uses it
    changed = tmp_path / "safe_qaq.yaml"
    docs = list(yaml.safe_load_all((COMPILED_DIR / SPEC_FILE).read_text("utf-8")))
    docs[0]["pipelineInfo"]["description"] = "changed"
    changed.write_text(yaml.safe_dump_all(docs), "utf-8")
    submit(kfp_api.url, arguments, token=TOKEN, spec=changed)
    versions = next(iter(kfp_api.versions.values()))
    assert kfp_api.uploads == 3 and len(kfp_api.pipelines) == 1 and len(versions) == 3
    latest = versions[2]["pipeline_version_id"]
    assert kfp_api.runs[-1]["pipeline_version_reference"]["pipeline_version_id"] == latest
    assert kfp_api.specs[latest] == changed.read_bytes()
    assert kfp_api.unauthorized == 0


def test_token_from_the_kubeconfig(
    tmp_path: Path, kfp_api: FakeKfpApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kf",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "contexts": [{"name": "kf", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
    }), "utf-8")  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert kubeconfig_token() == TOKEN
    assert kubeconfig_token({"KF_PIPELINES_TOKEN": "from-env", "KUBECONFIG": str(kubeconfig)}) == "from-env"
    assert kubeconfig_token({"KUBECONFIG": str(tmp_path / "missing")}) is None

    args = tmp_path / "args.yaml"
    args.write_text("data_uri: s3://teleguard/data/calls\nrun_lcrl: false\n", "utf-8")
    result = CliRunner().invoke(app, ["pipeline", "submit", "--host", kfp_api.url, "--args", str(args)])
    assert result.exit_code == 0, result.output
    assert kfp_api.runs[0]["runtime_config"]["parameters"] == {
        "data_uri": "s3://teleguard/data/calls",
        "run_lcrl": False,
    }


def test_a_wrong_token_is_refused(kfp_api: FakeKfpApi) -> None:
    with pytest.raises(Exception, match="401"):
        submit(kfp_api.url, {}, token="wrong")
    assert kfp_api.unauthorized >= 1 and not kfp_api.runs
