"""What a local pipeline run shows and what it keeps: one live line per step on the console, every step's full
output in `<run>/logs/<step>.log`, and with `verbose` the whole stream as before.

How KFP 2.17's local SubprocessRunner writes (kfp/local/subprocess_task_handler.py, task_dispatcher.py): each
step runs as a subprocess whose stdout and stderr share one pipe; this process reads that pipe line by line and
`print`s every line, indented by 4 spaces (`logging_utils.indented_print`). Around each step the runner logs
`Executing task 'name'` and, after it, `Task 'name' finished with status SUCCESS|FAILURE` (names and statuses
in ANSI colours) to sys.stdout through the root logger, then the task's outputs and a horizontal rule. So all
of a run's output passes through this process's stdout and stderr. The capture redirects file descriptors 1
and 2 onto a pipe (which also catches anything C code or another child writes to them) and points
sys.stdout / sys.stderr at it; a reader thread splits the lines by step on those two markers.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

LOGS_DIR = "logs"  # inside the run folder
RUNNER_LOG = "runner.log"  # the runner's own lines between steps
TIMES_FILE = "steps.json"  # status and seconds of every step
TAIL_LINES = 40  # of a failed step's log, shown on the console

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
START = re.compile(r"Executing task '(?P<step>[^']+)'")
END = re.compile(r"Task '(?P<step>[^']+)' finished with status (?P<status>SUCCESS|FAILURE)")
CACHED = re.compile(r"Task (?P<step>\S+) cache hit")
RULE = re.compile(r"^-{10,}$")  # the runner's horizontal rule after each task
STEP_INDENT = "    "  # the runner's indent of a step's own lines


@dataclass
class StepState:
    name: str
    what: str = ""
    status: str = "waiting"  # waiting, running, done, failed, cached, not run
    started: float | None = None
    ended: float | None = None

    def seconds(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return (self.ended if self.ended is not None else now or time.monotonic()) - self.started


STYLE = {
    "waiting": ("·", "dim"),
    "running": ("", "cyan"),
    "done": ("✓", "green"),
    "cached": ("✓", "green"),
    "failed": ("✗", "bold red"),
    "not run": ("-", "dim"),
}


class StepProgress:
    """The steps' states, one line each: a rich Live display on a terminal; elsewhere (a pipe, CI, a log) a plain
    line when a step starts and when it ends, since a Live display there would print only its last frame."""

    def __init__(self, steps: dict[str, str], console: Console) -> None:
        self.console = console
        self.steps = {name: StepState(name, what) for name, what in steps.items()}
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._spinner = Spinner("dots", style="cyan")

    def __enter__(self) -> StepProgress:
        if self.console.is_terminal:
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=4,
                redirect_stdout=False,  # the capture owns stdout and stderr
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.settle()
        if self._live is not None:
            self._live.stop()  # leaves the last frame on the screen

    def settle(self) -> None:
        """The run is over: steps still waiting did not run, one still running was interrupted."""
        with self._lock:
            for state in self.steps.values():
                if state.status == "waiting":
                    state.status = "not run"
                elif state.status == "running":
                    state.status, state.ended = "failed", time.monotonic()

    def _state(self, step: str) -> StepState:
        if step not in self.steps:  # a task the pipeline's STEPS does not list: still shown
            self.steps[step] = StepState(step)
        return self.steps[step]

    def start(self, step: str) -> None:
        with self._lock:
            state = self._state(step)
            state.status, state.started, state.ended = "running", time.monotonic(), None
        if self._live is None:
            self.console.print(self._line(state), highlight=False, soft_wrap=True)

    def finish(self, step: str, ok: bool, *, cached: bool = False) -> None:
        with self._lock:
            state = self._state(step)
            now = time.monotonic()
            if state.started is None:
                state.started = now
            state.status, state.ended = ("cached" if cached else "done") if ok else "failed", now
        if self._live is None:
            self.console.print(self._line(state), highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line above the steps (on a terminal) or printed once (elsewhere)."""
        with self._lock:
            self.notes.append(text)
        if self._live is None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def _line(self, state: StepState) -> str:
        mark, style = STYLE[state.status]
        if state.status == "running":
            return f"[{style}]▶ {state.name:<26} running[/{style}]  [dim]{state.what}[/dim]"
        seconds = state.seconds()
        took = "" if seconds is None else f"{seconds:6.0f} s"
        return f"[{style}]{mark} {state.name:<26} {state.status:<8}[/{style}] {took}"

    def render(self) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        for column in ("mark", "step", "status", "seconds", "what"):
            grid.add_column(column, justify="right" if column == "seconds" else "left", no_wrap=True)
        with self._lock:
            notes, states = list(self.notes), list(self.steps.values())
        now = time.monotonic()
        for state in states:
            mark, style = STYLE[state.status]
            seconds = state.seconds(now)
            grid.add_row(
                self._spinner if state.status == "running" else f"[{style}]{mark}[/{style}]",
                f"[{style}]{state.name}[/{style}]",
                f"[{style}]{state.status}[/{style}]",
                "" if seconds is None else f"{seconds:.0f} s",
                f"[dim]{state.what}[/dim]",
            )
        if not notes:
            return grid
        outer = Table.grid()
        for text in notes:
            outer.add_row(text)
        outer.add_row(grid)
        return outer

    def times(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                s.name: {
                    "status": s.status,
                    "seconds": None if s.seconds() is None else round(s.seconds(), 1),
                }
                for s in self.steps.values()
            }


@dataclass
class StepLogs:
    """Routes the run's output lines: a step's lines (from its `Executing task` marker to the rule after its
    `finished` marker) to `<logs>/<step>.log`, the rest to `<logs>/runner.log`; marker lines to the progress
    display. The run folder appears only once the first step's executor has started, so lines are held in
    memory until `find_run_dir` names it."""

    progress: StepProgress
    find_run_dir: Callable[[], Path | None]
    echo: IO[str] | None = None  # verbose: every line goes on to the console too
    current: str | None = None
    streaming: bool = False  # between the runner's "Streamed logs:" and its `finished` marker
    failed: str | None = None
    logs_dir: Path | None = None
    held: list[tuple[str, str]] = field(default_factory=list)
    tails: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, IO[str]] = field(default_factory=dict)
    _last_look: float = 0.0

    def feed(self, raw: str) -> None:
        line = ANSI.sub("", raw.rstrip("\n"))
        if self.echo is not None:  # the runner's colours only on a terminal
            self.echo.write((raw.rstrip("\n") if self.echo.isatty() else line) + "\n")
            self.echo.flush()
        text = line.strip()
        step = self.current
        if started := START.search(text):
            step = self.current = started["step"]
            self.streaming = False
            self.progress.start(step)
        elif ended := END.search(text):
            ok = ended["status"] == "SUCCESS"
            step = self.current = ended["step"]
            self.streaming = False
            if not ok:
                self.failed = step
            self.progress.finish(step, ok)
        elif cached := CACHED.search(text):
            self.progress.finish(cached["step"], True, cached=True)
        elif step is not None and self.streaming:  # the step's own output, as the runner indented it
            line = line.removeprefix(STEP_INDENT)
            tail = self.tails.setdefault(step, [])
            tail.append(line)
            del tail[: -TAIL_LINES * 4]  # enough of the end, whatever the log's length
        elif step is not None and text.endswith("Streamed logs:"):
            self.streaming = True
        self._write(step or RUNNER_LOG, line)
        if step is not None and not self.streaming and RULE.match(text):  # the rule closes a task's block
            self.current = None

    def _write(self, key: str, line: str) -> None:
        if self.logs_dir is None:
            now = time.monotonic()
            if now - self._last_look > 0.5:
                self._last_look = now
                self._open(self.find_run_dir())
        if self.logs_dir is None:
            self.held.append((key, line))
            return
        self._file(key).write(line + "\n")

    def _file(self, key: str) -> IO[str]:
        if key not in self.files:
            assert self.logs_dir is not None
            name = key if key == RUNNER_LOG else f"{key}.log"
            self.files[key] = (self.logs_dir / name).open("a", encoding="utf-8", buffering=1)
        return self.files[key]

    def _open(self, run_dir: Path | None) -> None:
        if run_dir is None or self.logs_dir is not None:
            return
        self.logs_dir = run_dir / LOGS_DIR
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.progress.note(f"step logs: {self.logs_dir}/<step>.log")
        for key, line in self.held:
            self._file(key).write(line + "\n")
        self.held.clear()

    def log_file(self, step: str) -> Path | None:
        return None if self.logs_dir is None else self.logs_dir / f"{step}.log"

    def close(self, run_dir: Path | None) -> None:
        self._open(run_dir)
        for handle in self.files.values():
            handle.close()
        self.files.clear()
        if self.logs_dir is not None:
            (self.logs_dir / TIMES_FILE).write_text(
                json.dumps(self.progress.times(), indent=2) + "\n", "utf-8"
            )


def _display_stream(stream: IO[str]) -> IO[str]:
    """Where the console goes while fds 1 and 2 are redirected: a copy of the original descriptor when `stream`
    writes to one of them (a terminal, a pipe), else `stream` itself (a test runner's buffer)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    if fd not in (1, 2):
        return stream
    stream.flush()
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return open(os.dup(fd), "w", encoding=encoding, errors="replace", buffering=1)


@contextmanager
def captured_output(sink: Callable[[str], None]) -> Iterator[None]:
    """File descriptors 1 and 2, sys.stdout and sys.stderr all onto one pipe, read line by line into `sink` by a
    thread. Restored on exit, however the block ends; every line has reached `sink` by then."""
    saved_streams = sys.stdout, sys.stderr
    for stream in saved_streams:
        stream.flush()
    read_fd, write_fd = os.pipe()
    saved_fds = os.dup(1), os.dup(2)
    errors: list[BaseException] = []

    def read() -> None:
        with open(read_fd, "rb") as pipe:
            for raw in pipe:
                try:
                    sink(raw.decode("utf-8", "replace"))
                except BaseException as err:  # keep draining: a blocked pipe would hang every writer
                    errors.append(err)

    reader = threading.Thread(target=read, name="pipeline-output", daemon=True)
    reader.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)  # the last write ends of the pipe close here: the reader reads to its end
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        reader.join(timeout=30)
    if errors:
        raise RuntimeError(f"reading the pipeline's output failed: {errors[0]!r}") from errors[0]


class RunWatch:
    """A local run's console and logs: `with RunWatch(steps, find_run_dir) as watch: run()`; afterwards
    `failed_step`, `tail(step)` and `logs.log_file(step)` tell what failed. `find_run_dir` names the run's
    folder once it exists (None before)."""

    def __init__(
        self, steps: dict[str, str], find_run_dir: Callable[[], Path | None], *, verbose: bool = False
    ) -> None:
        self.steps, self.find_run_dir, self.verbose = steps, find_run_dir, verbose
        self.progress: StepProgress | None = None
        self.logs: StepLogs | None = None
        self._capture: Any = None
        self._display: IO[str] = sys.stdout
        self._own_display = False

    def __enter__(self) -> RunWatch:
        self._display = _display_stream(sys.stdout)  # opened before the capture, closed after the display
        self._own_display = self._display is not sys.stdout
        console = Console(file=self._display)
        if console.is_terminal:  # measured now: while fds 1 and 2 are a pipe only stdin could tell the width
            console.width = console.width
        self.progress = StepProgress({} if self.verbose else self.steps, console)
        self.logs = StepLogs(self.progress, self.find_run_dir, echo=self._display if self.verbose else None)
        if not self.verbose:
            self.progress.__enter__()
        self._capture = captured_output(self.logs.feed)
        self._capture.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.progress is not None and self.logs is not None and self._capture is not None
        try:
            self._capture.__exit__(*exc)  # every line is read before the display stops
        finally:
            try:
                self.progress.settle()
                self.logs.close(self.find_run_dir())  # what is still held in memory, and the steps' times
            finally:
                if not self.verbose:
                    self.progress.__exit__(*exc)
                if self._own_display:
                    self._display.close()

    @property
    def failed_step(self) -> str | None:
        return None if self.logs is None else self.logs.failed

    def tail(self, step: str, lines: int = TAIL_LINES) -> list[str]:
        """The end of a step's own output: from its last traceback when there is one (what came before it is
        mostly the executor's input dump), else its last `lines` lines."""
        assert self.logs is not None
        kept = [line for line in self.logs.tails.get(step, []) if line.strip()]
        starts = [i for i, line in enumerate(kept) if line.startswith("Traceback (most recent call last)")]
        if starts:
            return kept[starts[-1] :][-lines * 3 // 2 :]
        return kept[-lines:]
