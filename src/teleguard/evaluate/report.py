"""Evaluation reports comparing stages or checkpoints (base, sft, grpo, rsft, lcrl, realtime, ...).

`write_report` turns `evaluate_predictions` results into `metrics.json`, `report.md` and a standalone
`report.html` (plots embedded as base64), with the plots also written as PNG files under `plots/`.
Markdown and HTML are rendered from one list of blocks, so the two always show the same numbers.
Results that hold per-set results (`result["eval_sets"][set]`, teleguard.evaluate.run) add a table per
evaluation set (docs/eval-sets.md).
"""

from __future__ import annotations

import base64
import html
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teleguard.contract.labels import english_name

DEFAULT_TITLE = "TeleGuard evaluation report"
TASKS: tuple[tuple[str, str], ...] = (
    ("scene", "Scene"),
    ("fraud", "Fraud (is_fraud)"),
    ("fraud_type", "Fraud type"),
)
_MISSING = "n/a"
MAIN_ROW = "held-out split"  # the first row of the per-set table: the main results, for reference


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class _Image:
    key: str  # the plot's key in write_report's result
    caption: str


@dataclass
class _Heading:
    text: str
    level: int = 2


@dataclass
class _Paragraph:
    text: str


_Block = _Heading | _Paragraph | _Table | _Image


@dataclass
class _Plots:
    """PNG files written so far, by key."""

    directory: Path
    paths: dict[str, Path] = field(default_factory=dict)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "stage"


def _tasks(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    return [(key, title) for key, title in TASKS if any(key in r for r in results.values())]


# ----------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    # A bare Figure with an Agg canvas: no pyplot global state and no change to the process's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, plots: _Plots, key: str) -> None:
    plots.directory.mkdir(parents=True, exist_ok=True)
    path = plots.directory / f"{key}.png"
    fig.tight_layout()
    with warnings.catch_warnings():
        # Stage names are user text: a CJK glyph missing from the font is drawn as a box, not an error.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, format="png")
    plots.paths[key] = path


def _bar_chart(plots: _Plots, key: str, stages: list[str], values: list[float], ylabel: str) -> None:
    fig = _figure(max(4.0, 1.0 + 0.9 * len(stages)), 3.2)
    ax = fig.add_subplot()
    bars = ax.bar(stages, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    _save(fig, plots, key)


def _grouped_bars(plots: _Plots, key: str, stages: list[str], series: dict[str, list[float]]) -> None:
    fig = _figure(max(4.5, 1.5 + 1.2 * len(stages)), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(stages))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("macro F1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
    _save(fig, plots, key)


def _heatmap(plots: _Plots, key: str, labels: list[str], matrix: list[list[int]], title: str) -> None:
    # English names: a font with CJK glyphs may be missing where reports are built.
    names = [english_name(label) for label in labels]
    size = 2.5 + 0.55 * len(labels)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "white" if top and count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    _save(fig, plots, key)


# ---------------------------------------------------------------------------------------------------- blocks


def _summary_blocks(results: dict[str, dict[str, Any]], plots: _Plots | None) -> list[_Block]:
    stages = list(results)
    blocks: list[_Block] = [_Heading("Classification (whole calls)")]
    rows = []
    for stage, result in results.items():
        for key, title in _tasks(results):
            m = result.get(key)
            if m is None:
                continue
            # No whole-call rows (a prefix-only run): n/a, not a misleading 0.000.
            scores = [m[k] if m["n_samples"] else None for k in ("accuracy", "weighted_f1", "macro_f1")]
            rows.append([stage, title, _num(m["n_samples"]), *(_num(v) for v in scores)])
    blocks.append(_Table(["stage", "task", "n", "accuracy", "weighted F1", "macro F1"], rows))

    blocks.append(_Heading("Output format and reasoning length"))
    rows = []
    for stage, result in results.items():
        per_task = [
            f"{_num(result[key]['well_formed_rate'])} / {_num(result[key]['mean_think_length'], 1)}"
            if key in result
            else _MISSING
            for key, _ in _tasks(results)
        ]
        rows.append(
            [
                stage,
                _num(result.get("n_outputs", 0)),
                _num(result.get("well_formed_rate", 0.0)),
                _num(result.get("mean_think_length", 0.0), 1),
                *per_task,
            ]
        )
    task_headers = [f"{title}: well-formed / think" for _, title in _tasks(results)]
    blocks.append(_Table(["stage", "outputs", "well-formed rate", "mean think length", *task_headers], rows))

    reasoned = {stage: r["reasoning"] for stage, r in results.items() if "reasoning" in r}
    if reasoned:  # is the reasoning about the call? (teleguard.data.evidence.reasoning_figures)
        blocks.append(_Heading("Reasoning about the call"))
        keys = ("answers", "distinct_reasoning_rate", "quoting_rate", "evidence_in_transcript_rate")
        headers = ["stage", "answers", "distinct reasoning", "quoting the call", "quotes found in the call"]
        blocks.append(
            _Table(headers, [[stage, *(_num(r[k]) for k in keys)] for stage, r in reasoned.items()])
        )

    if plots is not None:
        with_fraud = [s for s in stages if "fraud" in results[s]]
        if with_fraud:
            values = [results[s]["fraud"]["accuracy"] for s in with_fraud]
            _bar_chart(plots, "fraud_accuracy", with_fraud, values, "fraud accuracy")
            blocks.append(_Image("fraud_accuracy", "Fraud (is_fraud) accuracy per stage"))
        series = {
            title: [results[s].get(key, {}).get("macro_f1", 0.0) for s in stages]
            for key, title in _tasks(results)
        }
        if series:
            _grouped_bars(plots, "macro_f1", stages, series)
            blocks.append(_Image("macro_f1", "Macro F1 per stage and task"))
        _bar_chart(
            plots,
            "think_length",
            stages,
            [results[s].get("mean_think_length", 0.0) for s in stages],
            "mean think length",
        )
        blocks.append(_Image("think_length", "Mean think length per stage"))
    return blocks


def _eval_set_blocks(results: dict[str, dict[str, Any]]) -> list[_Block]:
    """One row per evaluation set, four columns per model: is_fraud accuracy and macro F1 over the set's whole
    calls, the well-formed rate over all its outputs, and n, the calls judged."""
    sets = list(dict.fromkeys(name for r in results.values() for name in r.get("eval_sets", {})))
    if not sets:
        return []

    def cells(result: dict[str, Any] | None) -> list[str]:
        if result is None:
            return [_MISSING] * 4
        fraud = result.get("fraud")
        n = fraud["n_samples"] if fraud else 0
        scores = [fraud[k] if n else None for k in ("accuracy", "macro_f1")] if fraud else [None, None]
        return [*(_num(v) for v in scores), _num(result.get("well_formed_rate", 0.0)), _num(n)]

    rows = [[MAIN_ROW, *(c for r in results.values() for c in cells(r))]]
    for name in sets:
        rows.append([name, *(c for r in results.values() for c in cells(r.get("eval_sets", {}).get(name)))])
    headers = ["set"] + [
        f"{model}: {column}"
        for model in results
        for column in ("fraud accuracy", "fraud macro F1", "well-formed rate", "n")
    ]
    return [
        _Heading("Results per evaluation set"),
        _Paragraph(
            "Whole calls of each evaluation set drawn from the held-out split (docs/eval-sets.md): gold is a "
            "balanced clean sample; disguised_opening, fraud_words_in_normal, code_switching and very_short "
            "are red-team sets. Fraud accuracy and macro F1 are the is_fraud round's; n counts its calls."
        ),
        _Table(headers, rows),
    ]


def _realtime_blocks(results: dict[str, dict[str, Any]]) -> list[_Block]:
    realtime = {stage: r["realtime"] for stage, r in results.items() if r.get("realtime")}
    if not realtime:
        return []
    rows = []
    for stage, rt in realtime.items():
        ttd = rt["time_to_detection_s"]
        rows.append(
            [
                stage,
                _num(rt["alert_threshold"], 2),
                _num(rt["stage_accuracy"]),
                _num(ttd["mean"], 1),
                _num(ttd["median"], 1),
                _num(rt["turns_to_detection"]["mean"], 1),
                f"{ttd['n_detected']} / {ttd['n_fraud_calls']}",
                _num(rt["early_detection_rate"]),
                _num(rt["false_alarm_rate"]),
            ]
        )
    headers = [
        "stage",
        "alert threshold",
        "stage accuracy",
        "mean TTD (s)",
        "median TTD (s)",
        "mean turns to detection",
        "detected",
        "early detection rate",
        "false alarm rate",
    ]
    return [
        _Heading("Real-time detection (call prefixes)"),
        _Paragraph(
            "TTD: time to detection, the audio seconds at a fraud call's first alert, over detected calls. "
            "Early detection: fraud calls alerted before the call ended. False alarm: normal calls alerted "
            "on any prefix."
        ),
        _Table(headers, rows),
    ]


def _confusion_blocks(results: dict[str, dict[str, Any]], plots: _Plots | None) -> list[_Block]:
    blocks: list[_Block] = [_Heading("Confusion matrices (rows: gold, columns: predicted)")]
    for stage, result in results.items():
        for key, title in _tasks(results):
            m = result.get(key)
            if not m or not m["n_samples"]:
                continue
            labels, matrix = m["confusion_matrix"]["labels"], m["confusion_matrix"]["matrix"]
            blocks.append(_Heading(f"{stage}: {title}", level=3))
            rows = [[label, *(str(c) for c in row)] for label, row in zip(labels, matrix, strict=True)]
            blocks.append(_Table(["gold \\ predicted", *labels], rows))
            per_class = [
                [
                    label,
                    english_name(label),
                    _num(c["precision"]),
                    _num(c["recall"]),
                    _num(c["f1"]),
                    _num(c["support"]),
                ]
                for label, c in m["per_class"].items()
            ]
            blocks.append(_Table(["label", "English", "precision", "recall", "F1", "support"], per_class))
            if plots is not None:
                plot_key = f"confusion_{_safe_name(stage)}_{key}"
                _heatmap(plots, plot_key, labels, matrix, f"{stage}: {title}")
                blocks.append(_Image(plot_key, f"{stage}: {title} confusion matrix"))
    return blocks


# ------------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, blocks: Sequence[_Block], plots: _Plots | None, out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, _Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif plots is not None:
            relative = plots.paths[block.key].relative_to(out_dir).as_posix()
            lines += [f"![{block.caption}]({relative})", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, "Noto Sans CJK SC", "Microsoft YaHei", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f3f7; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 0.5em 0 1.5em; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _html(title: str, blocks: Sequence[_Block], plots: _Plots | None) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            parts.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, _Table):
            head = "".join(f"<th>{e(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif plots is not None:
            data = base64.b64encode(plots.paths[block.key].read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(
    results: dict[str, dict[str, Any]],
    out_dir: Path,
    title: str = DEFAULT_TITLE,
    *,
    plots: bool = True,
) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and the plots for results keyed by stage/checkpoint name.

    `results` maps names such as "base", "sft", "grpo" to `evaluate_predictions` results, in the order the
    report should show them. Returns the written files: "json", "markdown", "html", and one entry per plot
    (its PNG under `out_dir/plots/`). Without matplotlib (or with `plots=False`) the report has no plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots and not _matplotlib_available():
        warnings.warn("matplotlib is not installed: the report is written without plots", stacklevel=2)
        plots = False
    plot_state = _Plots(out_dir / "plots") if plots else None

    blocks: list[_Block] = [_Paragraph("Stages: " + ", ".join(results) if results else "No results.")]
    if results:
        blocks += _summary_blocks(results, plot_state)
        blocks += _eval_set_blocks(results)
        blocks += _realtime_blocks(results)
        blocks += _confusion_blocks(results, plot_state)

    paths = {
        "json": out_dir / "metrics.json",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    paths["json"].write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["markdown"].write_text(_markdown(title, blocks, plot_state, out_dir), encoding="utf-8")
    paths["html"].write_text(_html(title, blocks, plot_state), encoding="utf-8")
    return {**paths, **(plot_state.paths if plot_state else {})}
