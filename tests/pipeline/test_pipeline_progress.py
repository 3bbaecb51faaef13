"""A local run's console and logs (issue 12): KFP's real local runner on two small components, then the real
`teleguard pipeline run --local` on a run whose first step fails.

The console shows one line per step change and no step output; each step's whole output (its stdout, its
stderr, what it writes to the file descriptor itself and what its own children print) is in its log file; a
failed step's tail reaches the console; `--verbose` streams everything.
"""

# no `from __future__ import annotations`: KFP reads the components' annotations as types
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from teleguard.pipeline.progress import LOGS_DIR, RUNNER_LOG, TIMES_FILE, RunWatch
from tests.support.paths import REPO

TELEGUARD = Path(sys.executable).parent / "teleguard"  # the installed entry point, as a user runs it


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def chatty(lines: int) -> int:
    import os
    import subprocess
    import sys

    for i in range(lines):
        print(f"chatty line {i}", flush=True)
    print("chatty on stderr", file=sys.stderr, flush=True)
    os.write(1, b"chatty on the descriptor\n")
    subprocess.run([sys.executable, "-c", "print('chatty grandchild')"], check=True)
    return lines


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def broken(lines: int) -> int:
    print(f"broken got {lines}")
    raise ValueError("broken on purpose")


@dsl.pipeline(name="progress-ok")
def two_steps(lines: int = 300):
    first = chatty(lines=lines)
    chatty(lines=first.output)


@dsl.pipeline(name="progress-broken")
def failing(lines: int = 3):
    first = chatty(lines=lines)
    second = broken(lines=first.output)
    chatty(lines=second.output)


STEPS = {"chatty": "talks a lot", "chatty-2": "talks again", "broken": "fails"}


def watched(
    pipeline, root: Path, monkeypatch: pytest.MonkeyPatch, **kw: object
) -> tuple[RunWatch, str, Path, RuntimeError | None]:
    """Run `pipeline` under a RunWatch: the watch, the console text (sys.stdout swapped for a buffer), the run
    folder, and the runner's error if a step failed."""
    console = io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

    def run_dir() -> Path | None:
        return next(iter(root.iterdir()), None)

    watch = RunWatch(STEPS, run_dir, **kw)
    error = None
    try:
        with watch:
            os.write(1, b"the runner's own descriptor\n")  # this process, below Python: captured too
            pipeline()
    except RuntimeError as err:
        error = err
    finally:
        monkeypatch.undo()
    folder = run_dir()
    assert folder is not None
    return watch, console.getvalue(), folder, error


def test_console_has_a_line_per_step_change_and_logs_have_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, console, run_dir, error = watched(two_steps, tmp_path, monkeypatch)
    assert error is None
    lines = console.splitlines()
    assert [line.split()[1:3] for line in lines if "step logs:" not in line] == [
        ["chatty", "running"], ["chatty", "done"], ["chatty-2", "running"], ["chatty-2", "done"]
    ]  # fmt: skip
    assert f"step logs: {run_dir / LOGS_DIR}/<step>.log" in lines
    assert "chatty line" not in console and "Executing task" not in console
    logs = run_dir / LOGS_DIR
    for step in ("chatty", "chatty-2"):
        text = (logs / f"{step}.log").read_text("utf-8")
        assert f"Executing task '{step}'" in text and f"Task '{step}' finished with status SUCCESS" in text
        assert "\nchatty line 0\n" in text and "\nchatty line 299\n" in text  # the runner's indent is gone
        for line in ("chatty on stderr", "chatty on the descriptor", "chatty grandchild"):
            assert f"\n{line}\n" in text, line
        assert "\x1b[" not in text  # the runner's colours are stripped
    runner = (logs / RUNNER_LOG).read_text("utf-8")
    assert "Running pipeline: 'progress-ok'" in runner and "the runner's own descriptor" in runner
    assert "chatty line" not in runner
    times = json.loads((logs / TIMES_FILE).read_text("utf-8"))
    assert times["chatty"]["status"] == times["chatty-2"]["status"] == "done"
    assert times["chatty"]["seconds"] > 0 and times["broken"] == {"status": "not run", "seconds": None}


def test_a_failed_step_is_named_with_the_tail_of_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, console, run_dir, error = watched(failing, tmp_path, monkeypatch)
    assert error is not None and "Inner task failed" in str(error)
    assert watch.failed_step == "broken"
    tail = watch.tail("broken")
    assert tail[0].startswith("Traceback") and tail[-1] == "ValueError: broken on purpose"
    assert "broken got 3" in watch.logs.tails["broken"]
    assert not any("finished with status" in line for line in tail)  # the step's own output only
    assert any(line.split()[1:3] == ["broken", "failed"] for line in console.splitlines())
    times = json.loads((run_dir / LOGS_DIR / TIMES_FILE).read_text("utf-8"))
    assert times["broken"]["status"] == "failed" and times["chatty-2"]["status"] == "not run"
    assert "ValueError: broken on purpose" in (run_dir / LOGS_DIR / "broken.log").read_text("utf-8")


def test_verbose_streams_the_whole_output_and_still_keeps_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, console, run_dir, _ = watched(two_steps, tmp_path, monkeypatch, verbose=True)
    assert "Executing task" in console and "chatty line 299" in console and "chatty grandchild" in console
    assert "\nchatty line 5\n" in (run_dir / LOGS_DIR / "chatty.log").read_text("utf-8")


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [str(TELEGUARD), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_run_whose_first_step_fails_shows_the_tail_and_exits_1(tmp_path: Path, verbose: bool) -> None:
    empty = tmp_path / "no-calls"
    empty.mkdir()
    result = run_cli(
        "pipeline", "run", "--local", "--args", "recipes/safe-qaq/pipeline-ci.yaml", "--arg", f"data_uri={empty}",
        "--root", str(tmp_path / "pipeline"), "--no-serve", *(["--verbose"] if verbose else []),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    [run_dir] = (tmp_path / "pipeline").iterdir()
    log = run_dir / LOGS_DIR / "build-data.log"
    assert f"{empty}: no .jsonl or .json files" in log.read_text("utf-8")
    # the tail on stderr, or with --verbose the stream on stdout
    assert f"{empty}: no .jsonl or .json files" in (result.stdout if verbose else result.stderr)
    assert "error: step 'build-data' failed" in result.stderr and f"full log: {log}" in result.stderr
    if verbose:
        assert "Executing task 'build-data'" in output and "the end of build-data's log" not in output
    else:
        assert "the end of build-data's log" in result.stderr
        tail = result.stderr.split("the end of build-data's log", 1)[1]
        assert tail.split("\n", 1)[1].startswith("Traceback (most recent call last)")  # not the input dump
        assert "Executing task" not in output and "executorInput" not in output
        assert len(output.splitlines()) < 60
