"""The `teleguard` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from teleguard.contract import Mode, PromptFileError, Round, load_prompts, parse_output
from teleguard.data.cli import app as data_app
from teleguard.evaluate.cli import evaluate as evaluate_command
from teleguard.pipeline.cli import app as pipeline_app
from teleguard.serve.cli import serve_command, stream_command
from teleguard.train.cli import train as train_command

app = typer.Typer(help="teleguard: train and serve slow-thinking call-fraud detectors.", no_args_is_help=True)
rewards_app = typer.Typer(help="SAFE-QAQ rewards.", no_args_is_help=True)
prompts_app = typer.Typer(help="The prompts of the task contract.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")
app.add_typer(prompts_app, name="prompts")
app.add_typer(data_app, name="data")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.add_typer(pipeline_app, name="pipeline")
app.command("serve")(serve_command)
app.command("stream")(stream_command)

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths and file:line stay on one line


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


@app.command()
def parse(
    text: Annotated[str, typer.Argument(help="a model output, or - to read it from standard input")],
    round: Annotated[Round | None, typer.Option(help="the round whose answer key to read")] = None,
) -> None:
    """Parse one model output with the contract's parser and print the result as JSON."""
    parsed = parse_output(sys.stdin.read() if text == "-" else text, round)
    fields = {k: v for k, v in vars(parsed).items() if k != "text"}
    fields["round"] = parsed.round.value if parsed.round else None
    fields["canonical_label"] = parsed.canonical_label
    console.print_json(json.dumps(fields, ensure_ascii=False))


@rewards_app.command("list")
def rewards_list() -> None:
    """The registered reward names (as --reward_funcs takes them)."""
    from teleguard.rewards import REWARDS

    for name, fn in REWARDS.items():
        console.print(f"[bold]{name}[/bold]  {(fn.__doc__ or '').strip().splitlines()[0]}", highlight=False)


def _read_scored_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, errors = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
                errors.append(f"{path}:{number}: field 'completion' must be a string")
                continue
            rows.append(row)
    return rows, errors


@rewards_app.command("score")
def rewards_score(
    file: Annotated[
        Path, typer.Argument(help="JSONL rows: completion plus columns (answers, conversation_stage)")
    ],
    reward: Annotated[
        list[str] | None,
        typer.Option(help="reward names (default: every rule reward; the model-backed ones only when named)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write each row with its reward values here")] = None,
) -> None:
    """Score model outputs with the rewards. Bad rows are reported with file and line and left out."""
    from teleguard.rewards import REWARDS, RULE_REWARDS

    names = reward or list(RULE_REWARDS)
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        _fail(f"unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARDS)}")
    if not file.is_file():
        _fail(f"{file}: no such file")
    rows, errors = _read_scored_rows(file)
    for error in errors:
        err_console.print(f"[yellow]skipped[/yellow] {error}", highlight=False)
    completions = [row["completion"] for row in rows]
    columns = {
        key: [row.get(key) for row in rows] for key in {k for row in rows for k in row} - {"completion"}
    }
    values: dict[str, list[float]] = {}
    for name in names:
        try:
            values[name] = REWARDS[name](completions, **columns)
        except ValueError as err:
            _fail(f"{file}: {err}")
    table = Table("reward", "mean", "min", "max", title=f"{len(rows)} rows scored, {len(errors)} skipped")
    for name, vals in values.items():
        if vals:
            table.add_row(name, f"{sum(vals) / len(vals):.4f}", f"{min(vals):.4f}", f"{max(vals):.4f}")
    console.print(table)
    if out:
        with out.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(
                    json.dumps({**row, "rewards": {n: v[i] for n, v in values.items()}}, ensure_ascii=False)
                    + "\n"
                )
    if errors:
        raise typer.Exit(1)


@prompts_app.command("show")
def prompts_show(
    round: Annotated[Round, typer.Option(help="which round")] = Round.FRAUD,
    mode: Annotated[Mode, typer.Option(help="offline, realtime or direct")] = Mode.OFFLINE,
    language: Annotated[str, typer.Option(help="zh or en (ignored with --file)")] = "zh",
    file: Annotated[Path | None, typer.Option(help="your own prompt file (YAML)")] = None,
    transcript: Annotated[
        str, typer.Option(help="call transcript to put in the prompt")
    ] = "甲：您好\n乙：你好",
    audio: Annotated[bool, typer.Option(help="the audio form of the first message")] = False,
) -> None:
    """Print one round's user prompt."""
    try:
        prompts = load_prompts(file or language)
    except (PromptFileError, ValueError) as err:
        _fail(str(err))
    console.print(prompts.user_prompt(round, mode, transcript=transcript, audio=audio), markup=False)


@app.command()
def plugins() -> None:
    """Paths of the ms-swift plugin files, for --external_plugins."""
    from teleguard.plugins import QWEN2_AUDIO_PLUGIN, REWARD_PLUGIN, VLLM_CPU_PLUGIN

    console.print(
        f"rewards:     {REWARD_PLUGIN}\nqwen2-audio: {QWEN2_AUDIO_PLUGIN}\nvllm-cpu:    {VLLM_CPU_PLUGIN}",
        highlight=False,
    )


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Argument(help="folder to write the model to")],
    arch: Annotated[str, typer.Option(help="qwen2, qwen3 or qwen2_audio")] = "qwen3",
    corpus: Annotated[
        list[Path] | None, typer.Option(help="text/JSONL files to train the tokenizer on")
    ] = None,
    vocab_size: Annotated[int, typer.Option(min=300)] = 2048,
    hidden_size: Annotated[int, typer.Option(min=16)] = 64,
    head_dim: Annotated[
        int, typer.Option(min=16, help="attention head width; vLLM's CPU build runs 32, 64, 80, ... (not 16)")
    ] = 16,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Build a random-initialised tiny Qwen model folder that ms-swift and transformers load, offline."""
    from teleguard.tiny_models import ARCHS, build_tiny_model, corpus_from_paths

    if arch not in ARCHS:
        _fail(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    missing = [str(p) for p in corpus or [] if not p.exists()]
    if missing:
        _fail(f"corpus file(s) not found: {', '.join(missing)}")
    try:
        model = build_tiny_model(
            out,
            arch,
            corpus_from_paths(corpus or []),
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            head_dim=head_dim,
            seed=seed,
        )
    except ValueError as err:
        _fail(str(err))
    console.print(
        f"built {model.arch} at {model.path}\nms-swift: {' '.join(model.swift_args())}", highlight=False
    )


if __name__ == "__main__":
    app()
