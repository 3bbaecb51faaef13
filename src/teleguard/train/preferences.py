"""Preference pairs and reward-model ranking (seed 004: a reward model, DPO and RM-ranked rejection sampling).

Pairs come from the sampled responses of stage 2a (`samples.jsonl`: each prompt row with its `samples`):

- chosen: the shortest correct response ("correct" as the rewards define it, see `teleguard.train.sampling`);
- rejected: a wrong response (invalid labels and unparsable answers first), or, when every response is correct,
  the longest one if its reasoning is at least `length_ratio` times the chosen one's (correct and short over long).

A prompt with no correct response gets the gold answer in the output grammar as its chosen response (with a
short fixed reasoning; counted as `reference_chosen`), so an early policy that solves little still yields pairs.
Prompts with nothing worse to set against the chosen response give no pair (and are counted).
Rows are ms-swift's preference format: `messages` ending with the chosen answer, and `rejected_response`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teleguard.contract import parse_output
from teleguard.engines import prompt_of_row
from teleguard.rewards import route_of, score_format, score_label
from teleguard.train.distill import student_target
from teleguard.train.sampling import is_correct, read_rows, shortest_correct, write_jsonl

REFERENCE_REASONING = "根据通话内容逐项核对后得出结论。"


def _badness(completion: str, gold: str, stage: str) -> float:
    """Lower is worse: the response's format plus classification reward."""
    parsed = parse_output(completion)
    return score_format(parsed) + score_label(parsed, route_of(gold), gold, stage)


@dataclass
class PairReport:
    prompts: int = 0
    pairs: int = 0
    wrong_rejected: int = 0
    long_rejected: int = 0
    reference_chosen: int = 0
    no_contrast: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def preference_pairs(
    rows: Sequence[dict[str, Any]], *, length_ratio: float = 1.5
) -> tuple[list[dict[str, Any]], PairReport]:
    """One pair per prompt row that has a correct response and a worse one (see the module docstring)."""
    report = PairReport()
    pairs: list[dict[str, Any]] = []
    for row in rows:
        report.prompts += 1
        gold, stage = row["answers"], row.get("conversation_stage", "complete")
        samples: list[str] = list(row.get("samples") or [])
        chosen = shortest_correct(samples, gold, stage)
        if chosen is None:
            chosen = student_target(row, REFERENCE_REASONING)
            report.reference_chosen += 1
        wrong = [s for s in samples if not is_correct(s, gold, stage)]
        if wrong:
            rejected = min(wrong, key=lambda s: _badness(s, gold, stage))
            report.wrong_rejected += 1
        else:
            longest = max(samples, key=lambda s: (parse_output(s).think_length, len(s)))
            if parse_output(longest).think_length < length_ratio * max(parse_output(chosen).think_length, 1):
                report.no_contrast += 1
                continue
            rejected = longest
            report.long_rejected += 1
        meta = {k: v for k, v in row.items() if k not in ("messages", "samples")}
        prompt = prompt_of_row(row)
        messages = [*prompt.messages, {"role": "assistant", "content": chosen}]
        pairs.append({"messages": messages, "rejected_response": rejected, **meta})
        report.pairs += 1
    return pairs, report


def write_pairs(samples_file: Path, out_file: Path, *, length_ratio: float = 1.5) -> dict[str, int]:
    pairs, report = preference_pairs(read_rows(samples_file), length_ratio=length_ratio)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_file, pairs)
    return report.as_dict()


@dataclass
class RewardModel:
    """A reward model trained by `swift rlhf --rlhf_type rm` (a sequence classifier with one score)."""

    path: Path
    max_length: int = 2048
    batch_size: int = 8
    _model: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)

    def _load(self) -> None:
        if self._model is None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._tokenizer.padding_side = "right"
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
            self._model.eval()

    def score(self, conversations: Sequence[list[dict[str, Any]]]) -> list[float]:
        """The reward of each conversation (the prompt messages plus the assistant's answer)."""
        import torch

        self._load()
        texts = [self._tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            with torch.no_grad():
                logits = self._model(**batch).logits
            scores += [float(v) for v in logits[:, 0]]
        return scores


def rank_by_reward_model(
    rows: Sequence[dict[str, Any]], reward_model: RewardModel
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RM-ranked rejection sampling: per prompt, the well-formed response the reward model scores highest.

    The report says how often the reward model's pick is also correct by the rules, so a reader can see how far
    the learned reward agrees with the rule reward it was trained from."""
    kept: list[dict[str, Any]] = []
    agree = unformed = 0
    for row in rows:
        prompt = prompt_of_row(row)
        candidates = [s for s in row.get("samples") or [] if score_format(parse_output(s)) == 1.0]
        if not candidates:
            unformed += 1
            continue
        scores = reward_model.score(
            [[*prompt.messages, {"role": "assistant", "content": s}] for s in candidates]
        )
        best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
        agree += is_correct(best, row["answers"], row.get("conversation_stage", "complete"))
        meta = {k: v for k, v in row.items() if k not in ("messages", "samples")}
        kept.append({"messages": [*prompt.messages, {"role": "assistant", "content": best}], **meta})
    report = {
        "prompts": len(rows),
        "kept": len(kept),
        "no_well_formed_sample": unformed,
        "rule_correct_rate_of_kept": agree / len(kept) if kept else 0.0,
    }
    return kept, report
