"""A fraud classifier as a reward (seed 002): a sequence-classification model scores the policy's reasoning.

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

**Reward** (`fraud_classifier`): for rows of the is_fraud round, the classifier reads the completion's reasoning
(the `<think>` text; the whole completion when there is none) and the reward is P(gold class | reasoning) x
`rewards.CORRECT` (5.0, the rule rewards' scale): reasoning that argues for the right verdict earns up to 5.
Rows of the other rounds (scene, fraud_type) get 0.0: the classifier knows only fraud vs normal. The model
folder comes from `TELEGUARD_CLASSIFIER_MODEL`, because the reward runs inside the ms-swift trainer process;
it is loaded once per process.

**Evaluation** (`classifier_reward_stats`, `reward_stats_markdown`): the reward's mean, spread, min and max over a
model's is_fraud whole-call predictions, so a report can show the reward before and after RL.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from teleguard.contract.labels import FRAUD, NORMAL, Round, Stage
from teleguard.contract.parser import parse_output
from teleguard.contract.prompts import Mode, PromptSet, builtin_prompts, load_prompts

__all__ = [
    "CLASSIFIER_DEVICE_ENV",
    "CLASSIFIER_ENV",
    "CLASSIFIER_MODEL_ENV",
    "DROP_FOR_SEQ_CLS",
    "FraudClassifier",
    "classifier_reward_stats",
    "classifier_rewards",
    "classifier_rows",
    "fraud_classifier",
    "get_classifier",
    "reward_stats_markdown",
    "train_classifier_args",
    "transcript_of",
    "write_classifier_dataset",
]

CLASSIFIER_MODEL_ENV = "TELEGUARD_CLASSIFIER_MODEL"  # the trained classifier folder the reward loads
CLASSIFIER_ENV = CLASSIFIER_MODEL_ENV  # the same variable, by the name the stage runner uses
CLASSIFIER_DEVICE_ENV = "TELEGUARD_CLASSIFIER_DEVICE"  # optional: "cpu", "cuda", "cuda:1" (default: auto)
FRAUD_LABEL, NORMAL_LABEL = 1, 0
DEFAULT_MAX_LENGTH = 1024

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


# ------------------------------------------------------------------------------------------------- classifier


class FraudClassifier:
    """A trained seq-cls model folder: `prob_fraud(texts)` is P(label 1 = fraud) for each text.

    Loads with AutoModelForSequenceClassification and the folder's tokenizer, in eval mode, on `device` (default:
    TELEGUARD_CLASSIFIER_DEVICE, else this rank's GPU when there is one, else the CPU). The text is tokenized
    bare, as `train_classifier_args` trains it, and truncated to `max_length` tokens from the left (default: the
    max_length in the folder's ms-swift args.json, else 1024).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a model folder (no config.json)")
        trained = _swift_args(self.model_dir)
        if trained.get("use_chat_template") is True:
            raise ValueError(
                f"{self.model_dir} was trained with the chat template; FraudClassifier scores bare text: "
                "train it with train_classifier_args (--use_chat_template false)"
            )
        self.max_length = int(max_length or trained.get("max_length") or DEFAULT_MAX_LENGTH)
        self.batch_size = batch_size
        self.device = torch.device(device or os.environ.get(CLASSIFIER_DEVICE_ENV) or _default_device())
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=dtype)
        if self.model.config.num_labels != 2:
            raise ValueError(
                f"{self.model_dir}: a fraud classifier has 2 labels, this one has {self.model.config.num_labels}"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self._lock = threading.Lock()  # one forward at a time (reward calls may come from several threads)

    def prob_fraud(self, texts: Sequence[str]) -> list[float]:
        """P(fraud) for each text, in batches of `batch_size`."""
        import torch

        probs: list[float] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = [t if t else " " for t in texts[start : start + self.batch_size]]
                encoded = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=False,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**encoded).logits.float()
                probs += torch.softmax(logits, dim=-1)[:, FRAUD_LABEL].tolist()
        return probs


def _swift_args(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "args.json"
    try:
        return json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


_cached: FraudClassifier | None = None
_cache_lock = threading.Lock()


def get_classifier(model_dir: str | Path | None = None) -> FraudClassifier:
    """The process's classifier: `model_dir`, else TELEGUARD_CLASSIFIER_MODEL; loaded once, reloaded only when
    the folder changes. ValueError (naming the variable) when the variable is unset or names no model folder."""
    global _cached
    if model_dir is None:
        location = os.environ.get(CLASSIFIER_MODEL_ENV)
        if not location:
            raise ValueError(
                f"reward 'fraud_classifier' needs {CLASSIFIER_MODEL_ENV}: set it to the trained classifier's "
                "model folder (the classifier stage's model/)"
            )
        model_dir = Path(location)
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"reward 'fraud_classifier': {CLASSIFIER_MODEL_ENV}={location} is not a model folder "
                "(missing, or no config.json): train the classifier stage first"
            )
    path = Path(model_dir).resolve()
    with _cache_lock:
        if _cached is None or _cached.model_dir.resolve() != path:
            _cached = None  # release the old model before loading the new one
            _cached = FraudClassifier(path)
        return _cached


# ------------------------------------------------------------------------------------------------------ reward


def _is_fraud_round(task: Any, gold: Any) -> bool:
    if task is not None:
        return task == Round.FRAUD.value and gold in (FRAUD, NORMAL)
    return gold in (FRAUD, NORMAL)


def classifier_rewards(
    classifier: FraudClassifier,
    completions: Sequence[Any],
    answers: Sequence[Any],
    tasks: Sequence[Any] | None = None,
) -> list[float]:
    """P(gold | reasoning) x 5.0 for is_fraud rows (gold "fraud"/"normal"), 0.0 for the other rounds' rows.

    Without `tasks`, a row belongs to the is_fraud round when its gold is "fraud" or "normal".
    """
    from teleguard.rewards import CORRECT

    tasks = tasks if tasks is not None else [None] * len(completions)
    parsed = [parse_output(c) for c in completions]
    scored = [i for i, (t, g) in enumerate(zip(tasks, answers, strict=True)) if _is_fraud_round(t, g)]
    values = [0.0] * len(completions)
    if scored:
        texts = [parsed[i].think or parsed[i].text for i in scored]
        for i, p in zip(scored, classifier.prob_fraud(texts), strict=True):
            values[i] = CORRECT * (p if answers[i] == FRAUD else 1.0 - p)
    return values


def fraud_classifier(completions: Sequence[Any], **columns: Any) -> list[float]:
    """Fraud-classifier reward: P(gold verdict | the completion's reasoning) x 5.0 on is_fraud rows, 0.0 elsewhere.

    Needs the `answers` column; uses `task` when present (else rows whose gold is fraud/normal count). The
    classifier folder comes from TELEGUARD_CLASSIFIER_MODEL (loaded once per process).
    """
    from teleguard.rewards import _column, _record

    n = len(completions)
    answers = _column(columns, "answers", n, "fraud_classifier")
    tasks = _column(columns, "task", n, "fraud_classifier") if columns.get("task") is not None else None
    values = classifier_rewards(get_classifier(), completions, answers, tasks)
    _record("fraud_classifier", [parse_output(c) for c in completions], values, answers=answers)
    return values


# -------------------------------------------------------------------------------------------------- evaluation


def classifier_reward_stats(model_dir: Path, predictions: Sequence[Any]) -> dict[str, Any]:
    """The fraud_classifier reward over the is_fraud whole-call predictions (`RoundPrediction`s).

    Returns mean, std (population standard deviation, numpy's default), min, max and n; with no such
    prediction n is 0 and the others None.
    """
    chosen = [p for p in predictions if p.task == Round.FRAUD.value and p.stage == Stage.COMPLETE]
    if not chosen:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    values = classifier_rewards(
        get_classifier(model_dir),
        [p.output for p in chosen],
        [p.gold for p in chosen],
        [p.task for p in chosen],
    )
    mean = sum(values) / len(values)
    return {
        "mean": mean,
        "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def reward_stats_markdown(stats_by_model: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of `classifier_reward_stats` by model (mean, std, n), e.g. before and after RL."""

    def number(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| model | mean | std | n |", "|---|---:|---:|---:|"]
    for name, stats in stats_by_model.items():
        lines.append(
            f"| {name} | {number(stats.get('mean'))} | {number(stats.get('std'))} | {stats.get('n', 0)} |"
        )
    return "\n".join(lines) + "\n"
