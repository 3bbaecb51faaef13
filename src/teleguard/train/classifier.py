"""The fraud classifier's training (seed 002): its seq-cls rows and its `swift sft` options.

**Data** (`classifier_rows`, `write_classifier_dataset`): from a built split, every call that has an is_fraud
round gives up to two examples, labelled 1 (fraud) or 0 (normal): the reference reasoning (the `<think>` of the
is_fraud assistant turn in `sft.jsonl`) and the call's transcript (from the first user message of that
conversation; audio splits have none). So the classifier learns both what fraud reasoning and what fraud calls
read like. Calls are balanced per label (the larger class is cut to the smaller one's size), picked in a fixed
order (sha256 of the call id), and the two labels alternate in the file: the same split always gives the same
rows. Rows are what `swift sft --task_type seq_cls` reads:

    {"messages": [{"role": "user", "content": TEXT}], "label": 0 | 1}

**Training** (`train_classifier_args`): `swift sft --task_type seq_cls --num_labels 2` on those rows, with
`--use_chat_template false` (the classifier reads the bare text: no system prompt or chat markup, so it is
scored at run time exactly as it was trained, whatever the policy's template) and `--truncation_strategy left`
(a long text keeps its end, where reasoning states its conclusion; `FraudClassifier` truncates the same way).

The classifier is a reward: `teleguard.rewards.classifier` loads what this trains and scores the policy's
reasoning with it. Building its rows from a split and choosing its ms-swift options are training, so they live
here, next to the stage that runs them, and the rewards never import the training code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from itertools import zip_longest
from pathlib import Path
from typing import Any

from teleguard.contract.labels import Round
from teleguard.contract.parser import parse_output
from teleguard.contract.prompts import Mode, PromptSet, builtin_prompts, load_prompts
from teleguard.rewards.classifier import DEFAULT_MAX_LENGTH, FRAUD_LABEL, NORMAL_LABEL

__all__ = [
    "DROP_FOR_SEQ_CLS",
    "classifier_rows",
    "train_classifier_args",
    "transcript_of",
    "write_classifier_dataset",
]

# ---------------------------------------------------------------------------------------------------- dataset

_SENTINEL = "\x00TRANSCRIPT\x00"
_SPEAKER_MARKS = ("左：", "右：")  # CallRecord.transcript() marks each line with its channel


def _prompt_sets(prompts: str | Path | PromptSet | None) -> list[PromptSet]:
    sets = [builtin_prompts("zh"), builtin_prompts("en")]
    if prompts is not None:
        sets.insert(0, prompts if isinstance(prompts, PromptSet) else load_prompts(prompts))
    return sets


def transcript_of(content: str, prompts: str | Path | PromptSet | None = None) -> str | None:
    """The call transcript inside a first-round user message, or None when it carries none (audio).

    The message is matched against every round and mode of the built-in prompts (and of `prompts`, a user prompt
    file, when given): what lies between the text before `$transcript` and the question is the transcript.
    A message no prompt set matches falls back to its lines that start with a speaker mark ("左：" / "右：").
    """
    if not isinstance(content, str) or not content:
        return None
    for prompt_set in _prompt_sets(prompts):
        for round_ in Round:
            for mode in Mode:
                head, _, tail = prompt_set.user_prompt(round_, mode, transcript=_SENTINEL).partition(
                    _SENTINEL
                )
                if (
                    len(content) > len(head) + len(tail)
                    and content.startswith(head)
                    and content.endswith(tail)
                ):
                    text = content[len(head) : len(content) - len(tail)].strip()
                    return text or None
    lines = [line for line in content.splitlines() if line.startswith(_SPEAKER_MARKS)]
    return "\n".join(lines) or None


def _is_fraud_examples(row: dict[str, Any], prompts: Any) -> tuple[str, bool, str | None, str | None] | None:
    """(call_id, is_fraud, reasoning, transcript) of an SFT row that holds an is_fraud round, else None."""
    messages = row.get("messages") or []
    first_user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    for message in messages:
        if message.get("role") != "assistant":
            continue
        parsed = parse_output(message.get("content"), round=Round.FRAUD)
        if parsed.answer is None or not isinstance(parsed.label, bool):
            continue
        transcript = transcript_of(first_user, prompts) if isinstance(first_user, str) else None
        return str(row.get("call_id", "")), parsed.label, parsed.think or None, transcript
    return None


def _order_key(call_id: str) -> str:
    return hashlib.sha256(call_id.encode("utf-8")).hexdigest()


def classifier_rows(
    split_dir: Path, limit: int | None = None, *, prompts: str | Path | PromptSet | None = None
) -> list[dict[str, Any]]:
    """The seq-cls rows of a fraud classifier from a built split folder (`<split>/sft.jsonl`).

    Per call of the is_fraud round: its reference reasoning and its transcript, label 1 for fraud, 0 for normal.
    Balanced: as many fraud as normal calls (the larger class cut, in sha256-of-call-id order), labels
    alternating. `limit`: at most this many rows in all (half per label). Each row also carries `kind`
    ("reasoning" / "transcript") and `call_id`, which ms-swift ignores.
    """
    source = Path(split_dir) / "sft.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist (build the datasets with `teleguard data build`)")
    calls: dict[bool, dict[str, tuple[str | None, str | None]]] = {True: {}, False: {}}
    with source.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            found = _is_fraud_examples(json.loads(line), prompts)
            if found is None:
                continue
            call_id, is_fraud, reasoning, transcript = found
            calls[is_fraud].setdefault(call_id, (reasoning, transcript))  # a call's first is_fraud round only
    per_label = min(len(calls[True]), len(calls[False]))

    def examples(is_fraud: bool) -> list[dict[str, Any]]:
        label = FRAUD_LABEL if is_fraud else NORMAL_LABEL
        chosen = sorted(calls[is_fraud], key=_order_key)[:per_label]
        rows = []
        for call_id in chosen:
            reasoning, transcript = calls[is_fraud][call_id]
            for kind, text in (("reasoning", reasoning), ("transcript", transcript)):
                if text:
                    rows.append(
                        {
                            "messages": [{"role": "user", "content": text}],
                            "label": label,
                            "kind": kind,
                            "call_id": call_id,
                        }
                    )
        return rows

    fraud, normal = examples(True), examples(False)
    if limit is not None:
        fraud, normal = fraud[: (limit + 1) // 2], normal[: limit // 2]
    return [row for pair in zip_longest(fraud, normal) for row in pair if row is not None]


def write_classifier_dataset(
    split_dir: Path,
    out_path: Path,
    limit: int | None = None,
    *,
    prompts: str | Path | PromptSet | None = None,
) -> dict[str, Any]:
    """Write `classifier_rows` as JSONL to `out_path`; returns the counts (rows, per label, per kind)."""
    rows = classifier_rows(split_dir, limit, prompts=prompts)
    if not rows:
        raise ValueError(
            f"{split_dir}: no classifier rows (a fraud classifier needs calls of both labels with an is_fraud round)"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, Any] = {
        "rows": len(rows),
        "fraud": sum(r["label"] == FRAUD_LABEL for r in rows),
        "normal": sum(r["label"] == NORMAL_LABEL for r in rows),
        "calls": len({r["call_id"] for r in rows}),
    }
    for kind in ("reasoning", "transcript"):
        counts[kind] = sum(r["kind"] == kind for r in rows)
    return counts


# --------------------------------------------------------------------------------------------------- training

# Our common ms-swift options left out of a seq-cls run. None of them breaks it (checked with ms-swift 4.6: full,
# and lora with target_modules q_proj/v_proj, where PEFT's SEQ_CLS task trains the `score` head in full and
# `swift export --merge_lora` gives a loadable classifier), but the classifier reads bare text: the policy's
# hybrid-thinking switch does not apply to it.
DROP_FOR_SEQ_CLS = ("enable_thinking",)


def train_classifier_args(
    dataset: Path,
    common: Mapping[str, Any] | None = None,
    *,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The ms-swift options of `swift sft` for the fraud classifier, merged over `common` when given.

    Pass the model flags (`--model`, `--model_type`, `--template`) and the schedule (learning_rate, max_steps...)
    as for any stage; the options in `DROP_FOR_SEQ_CLS` are removed from `common`. `max_length` (default: the
    common one, else 1024) bounds the tokens the classifier reads; longer texts keep their end.
    """
    options = {k: v for k, v in (common or {}).items() if k not in DROP_FOR_SEQ_CLS}
    options.update(
        task_type="seq_cls",
        num_labels=2,
        problem_type="single_label_classification",
        use_chat_template=False,
        truncation_strategy="left",
        max_length=max_length or options.get("max_length") or DEFAULT_MAX_LENGTH,
        dataset=str(dataset),
    )
    return options
