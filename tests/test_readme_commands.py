"""Every command the README shows is run by a test the way a user runs it (issue 12).

`README_COMMANDS` maps each `teleguard ...` and `make ...` line of the README's bash blocks, as written there, to
the test that runs it and how. The table is checked both ways: a command the README gains must be added (with
the test that runs it), and every test it names must exist. The cheap commands are run here, word for word
from the README, as subprocesses of the installed `teleguard` in a scratch folder laid out like a checkout
(`../shared/data/...` holds a small copy of the shared transcripts); the expensive ones are run by the tests
the table names. The few that no test can run here (GPU recipes, the full CPU recipe, the test suite itself)
are in `NOT_RUN` with the reason and what runs the same code instead.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from teleguard.contract import Mode, Round, format_answer, load_prompts
from teleguard.pipeline.registry import PIPELINES
from teleguard.rewards import REWARDS
from tests.support.fake_kfp import FakeKfpApi
from tests.support.paths import REPO, TRANSCRIPTS_DIR, sample_transcripts

README = REPO / "README.md"
BIN = Path(sys.executable).parent  # where `teleguard` is installed, as on a user's PATH
HERE = "tests/test_readme_commands.py"
LOCAL = "tests/pipeline/test_pipeline_local.py"

# README command -> (the test that runs it, how it runs it)
README_COMMANDS: dict[str, tuple[str, str]] = {
    "make gpu-check DEVICE=cpu": (
        "tests/bench/test_gpu_check.py::test_gpu_check_dry_run_on_cpu",
        "the script the target runs (test_make_gpu_check_runs_the_script reads it from `make -n`), as a subprocess",
    ),
    "make demo": (
        f"{LOCAL}::test_main_command_through_the_cli",
        "the command `make -n demo` prints, with the CI-sized recipes/safe-qaq/pipeline-ci.yaml, as a subprocess",
    ),
    "teleguard data ingest --format dialogues ../shared/data/teleantifraud-dialogues/*.jsonl --out data/calls": (
        f"{HERE}::test_call_data_commands",
        "verbatim, on a small copy of the shared transcripts",
    ),
    "teleguard data split data/calls --out data/splits": (f"{HERE}::test_call_data_commands", "verbatim"),
    "teleguard data build data/splits --out data/datasets/text": (
        f"{HERE}::test_call_data_commands",
        "verbatim",
    ),
    "teleguard data audio data/splits/dev --out data/audio/dev --limit 20": (
        f"{HERE}::test_call_data_commands",
        "verbatim (espeak-ng)",
    ),
    "teleguard data prefixes data/splits/dev --out data/dev-prefixes.jsonl": (
        f"{HERE}::test_call_data_commands",
        "verbatim",
    ),
    "teleguard data build SPLITS --out DIR --eval-sets all --eval-set-size 64": (
        f"{HERE}::test_call_data_commands",
        "SPLITS and DIR filled in",
    ),
    "teleguard pipeline compile": (f"{HERE}::test_pipeline_compile", "verbatim, in a scratch folder"),
    "teleguard pipeline run --local [--pipeline NAME] [--args FILE] [--arg name=value] [--upload s3://bucket/runs]": (
        f"{LOCAL}::test_main_command_through_the_cli",
        "--args and --arg as a subprocess; --upload in process by test_s3_data_registry_and_artifacts",
    ),
    "teleguard pipeline run --local [--no-serve] [--verbose]": (
        f"{LOCAL}::test_main_command_through_the_cli",
        "with the serving demo, as a subprocess; --no-serve and --verbose in tests/pipeline/test_pipeline_progress.py",
    ),
    "teleguard pipeline submit --host https://<kubeflow>/pipeline --args my-args.yaml [--arg gpu_count=8]": (
        f"{HERE}::test_pipeline_submit",
        "verbatim against a KFP API stand-in on loopback",
    ),
    "teleguard pipeline run --local --pipeline rm-dpo": (
        "tests/pipeline/test_seed_recipes.py::test_rm_dpo_recipe",
        "in process (teleguard.pipeline.local.run_local, what the command calls), CI-sized",
    ),
    "make recipe-teacher-judge": (
        "tests/pipeline/test_seed_recipes.py::test_teacher_judge_recipe",
        "in process, CI-sized",
    ),
    "make recipe-classifier-reward": (
        "tests/pipeline/test_seed_recipes.py::test_classifier_reward_recipe",
        "in process, CI-sized",
    ),
    "make recipe-distill-cascade": (
        "tests/pipeline/test_seed_recipes.py::test_distill_cascade_recipe",
        "in process, CI-sized",
    ),
    "make recipe-rm-dpo": ("tests/pipeline/test_seed_recipes.py::test_rm_dpo_recipe", "in process, CI-sized"),
    "teleguard serve --model runs/registry/teleguard-detector/<version>": (
        f"{LOCAL}::test_serve_and_stream_as_the_readme_shows",
        "the main command's trained model, as a subprocess on a free port",
    ),
    "teleguard serve --model DIR": (f"{LOCAL}::test_serve_and_stream_as_the_readme_shows", "as a subprocess"),
    "teleguard serve --model DIR --session-store redis://HOST:6379/0": (
        "tests/serve/test_replicas.py::test_rest_chunks_alternating_replicas_lose_and_repeat_nothing",
        "two subprocesses with --session-store on a real redis-server on loopback; --config gives the remote "
        "engine (a scripted endpoint) in place of --model",
    ),
    "teleguard stream runs/data/splits/test/calls.jsonl --index 3 --speed 10": (
        f"{LOCAL}::test_serve_and_stream_as_the_readme_shows",
        "the run's held-out calls, as a subprocess",
    ),
    "teleguard stream fraud_dialogues-x.jsonl --call-id tts_fraud_00079 --speed 0 --http": (
        f"{LOCAL}::test_serve_and_stream_as_the_readme_shows",
        "a shared fraud file, as a subprocess",
    ),
    "teleguard stream CALL --url URL [--speed X] [--http]": (
        f"{LOCAL}::test_serve_and_stream_as_the_readme_shows",
        "as a subprocess",
    ),
    "teleguard stream call.wav --url http://127.0.0.1:8080": (
        "tests/serve/test_stream_client.py::test_audio_call_over_websocket_and_http",
        "in process (typer's CliRunner) against a tiny audio model's server",
    ),
    "teleguard rewards list": (f"{HERE}::test_rewards_parse_prompts_and_plugins", "verbatim"),
    "teleguard rewards score outputs.jsonl": (f"{HERE}::test_rewards_parse_prompts_and_plugins", "verbatim"),
    "teleguard parse '<think>…</think><answer>{…}</answer>'": (
        f"{HERE}::test_rewards_parse_prompts_and_plugins",
        "verbatim",
    ),
    "teleguard prompts show --round is_fraud --mode realtime --language en [--file my-prompts.yaml]": (
        f"{HERE}::test_rewards_parse_prompts_and_plugins",
        "verbatim, without and with --file",
    ),
    "teleguard tiny-model out/tiny-qwen3 --arch qwen3 --corpus ../shared/data/teleantifraud-dialogues/normal_dialogues-20250303_015751.jsonl": (
        f"{HERE}::test_tiny_model",
        "verbatim, on a small copy of the corpus",
    ),
    "teleguard plugins": (f"{HERE}::test_rewards_parse_prompts_and_plugins", "verbatim"),
}

# README commands no test runs as a user would, why, and what runs the same code
NOT_RUN: dict[str, str] = {
    "make test": "the test suite itself (CI runs it)",
    "make gpu-check": (
        "needs a GPU (CI has none); `make gpu-check DEVICE=cpu` runs the same script and code path in "
        "tests/bench/test_gpu_check.py"
    ),
    "teleguard train all --config recipes/safe-qaq/qwen2-audio-7b.yaml": (
        "Qwen2-Audio-7B on GPUs; the same Runner runs the CPU recipe's stages in tests/train/test_grpo_text.py, "
        "tests/train/test_train_stages.py (which runs `teleguard.cli train sft` as a subprocess) and the pipeline tests"
    ),
    "teleguard train grpo -c recipes/safe-qaq/tiny-cpu.yaml --set stages.grpo.max_steps=2": (
        "needs the CPU recipe's warm start (800 SFT steps) first; GRPO through the same Runner: "
        "tests/train/test_grpo_text.py, and the pipeline's grpo-stage1 step in the main command's test"
    ),
    "teleguard evaluate -c recipes/safe-qaq/tiny-cpu.yaml": (
        "needs every stage of the CPU recipe trained; the same evaluation runs as the pipeline's evaluate step "
        "in the main command's test and in tests/evaluate/test_evaluate.py"
    ),
    "make cpu-recipe": "about 15 minutes on 2 cores; its stages run CI-sized through the pipeline's steps",
}


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` outside quotes, at the start or after a blank)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str | None = None) -> list[str]:
    """The `teleguard ...` and `make ...` commands of the README's bash blocks, whitespace collapsed."""
    text = README.read_text("utf-8") if text is None else text
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        pending = ""
        for raw in block.splitlines():
            line = pending + _strip_comment(raw).strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            command = " ".join(line.split())
            if command.split(" ", 1)[0] in ("teleguard", "make"):
                commands.append(command)
    return commands


def _test_exists(reference: str) -> bool:
    path, _, name = reference.partition("::")
    tree = ast.parse((REPO / path).read_text("utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.walk(tree))


def test_the_readme_command_parser() -> None:
    text = "```bash\nmake demo   # a comment\n  # only a comment\nteleguard parse '#x'  \\\n  --y 1\nswift sft\n```\n"
    assert readme_commands(text) == ["make demo", "teleguard parse '#x' --y 1"]


def test_every_readme_command_is_run_by_a_test() -> None:
    commands = readme_commands()
    assert len(commands) == len(set(commands)), "a command appears twice in the README"
    assert not set(README_COMMANDS) & set(NOT_RUN)
    missing = [c for c in commands if c not in README_COMMANDS and c not in NOT_RUN]
    assert not missing, f"README commands no test runs (add each to README_COMMANDS in {HERE}): {missing}"
    gone = sorted((set(README_COMMANDS) | set(NOT_RUN)) - set(commands))
    assert not gone, f"commands in {HERE}'s table the README no longer shows: {gone}"
    absent = sorted({test for test, _ in README_COMMANDS.values() if not _test_exists(test)})
    assert not absent, f"the table names tests that do not exist: {absent}"


def readme(command: str) -> str:
    """A command exactly as the README shows it (so a test here runs what the README says)."""
    assert command in readme_commands(), f"the README no longer shows {command!r}"
    return command


def optional(command: str, keep: bool) -> str:
    """A command's `[--option ...]` parts kept (brackets dropped) or left out."""
    return " ".join(re.sub(r"\[([^]]*)\]", r"\1" if keep else "", command).split())


def sh(command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """`command` in a shell, as typed at a prompt with the installed teleguard on PATH; its output (exit 0)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200", **(env or {})}
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch working folder beside a `shared/` holding the first 30 calls of every shared transcript file,
    so the README's relative paths (`../shared/data/...`) resolve as in a checkout."""
    if not TRANSCRIPTS_DIR.is_dir():
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    root = tmp_path_factory.mktemp("readme")
    sample_transcripts(root / "shared" / "data" / TRANSCRIPTS_DIR.name, 30)
    (root / "work").mkdir()
    return root / "work"


def test_call_data_commands(checkout: Path) -> None:
    out = sh(readme("teleguard data ingest --format dialogues ../shared/data/teleantifraud-dialogues/*.jsonl --out data/calls"), checkout)  # fmt: skip
    assert "210 calls accepted, 0 rejected -> data/calls" in out
    out = sh(readme("teleguard data split data/calls --out data/splits"), checkout)
    counts = {split: int(n) for split, n in re.findall(r"^(train|dev|test): (\d+) calls", out, flags=re.M)}
    assert sum(counts.values()) == 210 and counts["train"] > counts["dev"] > 0
    sh(readme("teleguard data build data/splits --out data/datasets/text"), checkout)
    for split in ("train", "dev", "test"):
        for name in ("sft", "grpo", "realtime"):
            assert (checkout / "data" / "datasets" / "text" / split / f"{name}.jsonl").stat().st_size > 0
    card = json.loads((checkout / "data" / "datasets" / "text" / "train" / "card.json").read_text("utf-8"))
    assert card
    out = sh(readme("teleguard data prefixes data/splits/dev --out data/dev-prefixes.jsonl"), checkout)
    prefixes = (checkout / "data" / "dev-prefixes.jsonl").read_text("utf-8").splitlines()
    assert f"{len(prefixes)} prefixes -> data/dev-prefixes.jsonl" in out and len(prefixes) > counts["dev"]
    command = readme("teleguard data build SPLITS --out DIR --eval-sets all --eval-set-size 64")
    out = sh(command.replace("SPLITS", "data/splits").replace("DIR", "data/with-sets"), checkout)
    sets = checkout / "data" / "with-sets" / "eval_sets"
    assert {"gold", "disguised_opening", "fraud_words_in_normal", "code_switching", "very_short"} <= {
        p.name for p in sets.iterdir() if p.is_dir()
    }
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make setup installs it): the audio command is not run")
    out = sh(readme("teleguard data audio data/splits/dev --out data/audio/dev --limit 20"), checkout)
    assert "20 calls with audio -> data/audio/dev" in out
    assert len(list((checkout / "data" / "audio" / "dev").rglob("*.wav"))) >= 20


def test_rewards_parse_prompts_and_plugins(checkout: Path) -> None:
    listed = sh(readme("teleguard rewards list"), checkout)
    assert {line.split()[0] for line in listed.splitlines() if line and not line[0].isspace()} >= set(REWARDS)

    good = format_answer(Round.FRAUD, True, reason="索要验证码", think="来电方索要短信验证码。")
    rows = [
        {"completion": good, "answers": "fraud", "conversation_stage": "complete"},
        {"completion": "no tags at all", "answers": "fraud", "conversation_stage": "complete"},
    ]
    (checkout / "outputs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    scored = sh(readme("teleguard rewards score outputs.jsonl"), checkout)
    assert "2 rows scored, 0 skipped" in scored
    expected = REWARDS["prompt_format"]([r["completion"] for r in rows])
    assert f"{sum(expected) / 2:.4f}" in scored  # the mean of the format reward over the two rows

    parsed = json.loads(sh(readme("teleguard parse '<think>…</think><answer>{…}</answer>'"), checkout))
    assert parsed["think"] == "…" and parsed["well_formed"] is False and parsed["problems"]
    real = json.loads(sh(f"teleguard parse {shlex.quote(good)}", checkout))
    assert real["well_formed"] is True and real["label"] is True and real["think"] == "来电方索要短信验证码。"

    command = readme(
        "teleguard prompts show --round is_fraud --mode realtime --language en [--file my-prompts.yaml]"
    )
    expected_prompt = load_prompts("en").user_prompt(
        Round.FRAUD, Mode.REALTIME, transcript="甲：您好\n乙：你好"
    )
    assert sh(optional(command, keep=False), checkout).strip() == expected_prompt.strip()
    package_prompts = Path(sys.modules["teleguard.contract"].__file__).parent / "prompts" / "en.yaml"
    (checkout / "my-prompts.yaml").write_text(package_prompts.read_text("utf-8"), "utf-8")
    assert sh(optional(command, keep=True), checkout).strip() == expected_prompt.strip()

    plugins = dict(line.split(":", 1) for line in sh(readme("teleguard plugins"), checkout).splitlines())
    assert set(plugins) == {"rewards", "qwen2-audio", "vllm-cpu"}
    assert all(Path(path.strip()).is_file() for path in plugins.values())


def test_tiny_model(checkout: Path) -> None:
    command = readme(
        "teleguard tiny-model out/tiny-qwen3 --arch qwen3 --corpus "
        "../shared/data/teleantifraud-dialogues/normal_dialogues-20250303_015751.jsonl"
    )
    out = sh(command, checkout)
    assert "built qwen3 at out/tiny-qwen3" in out and "--model_type qwen3" in out
    config = json.loads((checkout / "out" / "tiny-qwen3" / "config.json").read_text("utf-8"))
    assert config["model_type"] == "qwen3"
    assert (checkout / "out" / "tiny-qwen3" / "tokenizer.json").is_file()


def test_pipeline_compile(checkout: Path) -> None:
    out = sh(readme("teleguard pipeline compile"), checkout)
    for info in PIPELINES.values():
        for name in (info.spec_file, info.manifest_file):
            path = checkout / "pipelines" / "compiled" / name
            assert f"wrote pipelines/compiled/{name}" in out and path.is_file()
            assert list(yaml.safe_load_all(path.read_text("utf-8")))


def test_pipeline_submit(checkout: Path) -> None:
    token = "tg-readme-token"
    command = readme(
        "teleguard pipeline submit --host https://<kubeflow>/pipeline --args my-args.yaml [--arg gpu_count=8]"
    )
    (checkout / "my-args.yaml").write_text("data_uri: s3://teleguard/data/calls\nuse_audio: false\n", "utf-8")
    with FakeKfpApi(token) as api:
        out = sh(optional(command.replace("https://<kubeflow>/pipeline", api.url), keep=True), checkout,
                 env={"KF_PIPELINES_TOKEN": token})  # fmt: skip
        assert len(api.runs) == 1 and api.unauthorized == 0
        run = api.runs[0]
    assert f"run {run['run_id']} started in experiment 'teleguard'" in out
    assert run["runtime_config"]["parameters"] == {
        "data_uri": "s3://teleguard/data/calls", "use_audio": False, "gpu_count": 8
    }  # fmt: skip
