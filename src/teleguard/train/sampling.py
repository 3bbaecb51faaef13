"""Stage 2a: rejection sampling. N samples per prompt, the shortest correct one kept as an SFT target.

"Correct" is what the rewards call correct, through the same parser: the round's label earns the full
classification reward for the row's gold answer and stage (so a null label in an early_stage prompt counts,
a string "不正常" for is_fraud never does), and the output is fully well-formed (format reward 1.0, nothing
after `</answer>`). Among correct samples the one with the shortest reasoning wins (estimated think length,
then characters). Prompts with no correct sample are written to a report instead of being dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teleguard.contract import parse_output
from teleguard.engines import Engine, SamplingParams, prompt_of_row
from teleguard.rewards import CORRECT, route_of, score_format, score_label

if TYPE_CHECKING:
    from teleguard.train.config import Recipe


def is_correct(completion: str, gold: str, stage: str) -> bool:
    parsed = parse_output(completion)
    return score_format(parsed) == 1.0 and score_label(parsed, route_of(gold), gold, stage) == CORRECT


def shortest_correct(samples: Sequence[str], gold: str, stage: str) -> str | None:
    correct = [s for s in samples if is_correct(s, gold, stage)]
    return min(correct, key=lambda s: (parse_output(s).think_length, len(s))) if correct else None


@dataclass
class Selection:
    rows: list[dict[str, Any]]  # ms-swift SFT rows: the prompt plus the kept response
    unsolved: list[dict[str, Any]]  # prompts with no correct sample, for the report
    correct_samples: int = 0
    total_samples: int = 0

    def report(self) -> dict[str, Any]:
        prompts = len(self.rows) + len(self.unsolved)
        return {
            "prompts": prompts,
            "kept": len(self.rows),
            "unsolved": len(self.unsolved),
            "solved_rate": len(self.rows) / prompts if prompts else 0.0,
            "sample_accuracy": self.correct_samples / self.total_samples if self.total_samples else 0.0,
            "unsolved_by_task": dict(Counter(u.get("task") for u in self.unsolved)),
        }


def select(rows: Sequence[dict[str, Any]], samples: Sequence[Sequence[str]]) -> Selection:
    """Keep the shortest correct sample of each prompt row (rows carry `answers` and `conversation_stage`)."""
    selection = Selection(rows=[], unsolved=[])
    for row, outs in zip(rows, samples, strict=True):
        gold, stage = row["answers"], row.get("conversation_stage", "complete")
        selection.total_samples += len(outs)
        selection.correct_samples += sum(is_correct(o, gold, stage) for o in outs)
        best = shortest_correct(outs, gold, stage)
        meta = {k: v for k, v in row.items() if k != "messages"}
        if best is None:
            problems = Counter(p for o in outs for p in parse_output(o).problems)
            selection.unsolved.append(
                {**meta, "samples": len(outs), "problems": dict(problems.most_common(5))}
            )
            continue
        prompt = prompt_of_row(row)
        sft = {"messages": [*prompt.messages, {"role": "assistant", "content": best}], **meta}
        selection.rows.append(sft)
    return selection


def sampling_params(stage: Any) -> SamplingParams:
    """The sample stage's settings (teleguard.train.config.SampleStage) as engine sampling parameters."""
    return SamplingParams(
        n=stage.num_samples,
        temperature=stage.temperature,
        top_p=stage.top_p,
        top_k=stage.top_k,
        max_tokens=stage.max_tokens,
        seed=stage.seed,
    )


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_samples(
    engine: Engine, rows: Sequence[dict[str, Any]], params: SamplingParams, batch_size: int = 16
) -> list[list[str]]:
    """`params.n` samples for each prompt row, generated in batches."""
    samples: list[list[str]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        samples += engine.generate([prompt_of_row(r) for r in batch], params)
    return samples


def write_selection(
    rows: Sequence[dict[str, Any]], samples: Sequence[Sequence[str]], out_dir: Path
) -> dict[str, Any]:
    """Select, and write `sft.jsonl` (kept rows), `unsolved.jsonl` and `report.json` to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    selection = select(rows, samples)
    write_jsonl(out_dir / "sft.jsonl", selection.rows)
    write_jsonl(out_dir / "unsolved.jsonl", selection.unsolved)
    report = selection.report()
    (out_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return report


SAMPLES_FILE = (
    "samples.jsonl"  # every prompt row with all its samples: selection, pairs and RM ranking read it
)


def sample_recipe(recipe: Recipe, model: Path, datasets: Path, out_dir: Path) -> tuple[Path, int]:
    """Stage 2a's first half, as the recipe's sample stage says: N samples for each training prompt row (up to
    `limit`) from `model`, written with their rows to `out_dir/samples.jsonl`. Returns (the prompt file, rows).

    The one implementation of the sampling: `teleguard train` (the Runner) and the pipeline's step call it."""
    from teleguard.engines import recipe_engine

    s = recipe.stages.sample
    source = datasets / recipe.data.train_split / "grpo.jsonl"
    rows = read_rows(source, s.limit)
    engine = recipe_engine(recipe, model, datasets, kind=s.engine, batch_size=s.batch_size)
    samples = generate_samples(engine, rows, sampling_params(s), s.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out_dir / SAMPLES_FILE, ({**row, "samples": outs} for row, outs in zip(rows, samples, strict=True))
    )
    return source, len(rows)


def select_samples(samples_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Stage 2a's second half: the shortest correct sample of each row of `samples_dir/samples.jsonl`, written to
    `out_dir` (`write_selection`); returns the report."""
    rows = read_rows(samples_dir / SAMPLES_FILE)
    samples = [row.pop("samples") for row in rows]
    return write_selection(rows, samples, out_dir)


def rejection_sample(
    engine: Engine,
    rows: Sequence[dict[str, Any]],
    params: SamplingParams,
    out_dir: Path,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Sample and select (stage 2a in one go)."""
    return write_selection(rows, generate_samples(engine, rows, params, batch_size), out_dir)
