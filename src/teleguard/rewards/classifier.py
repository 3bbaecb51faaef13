"""The fraud-classifier reward (seed 002): a sequence-classification model scores the policy's reasoning.

**Reward** (`fraud_classifier`): for rows of the is_fraud round, the classifier reads the completion's reasoning
(the `<think>` text; the whole completion when there is none) and the reward is P(gold class | reasoning) x
`CORRECT` (5.0, the rule rewards' scale): reasoning that argues for the right verdict earns up to 5.
Rows of the other rounds (scene, fraud_type) get 0.0: the classifier knows only fraud vs normal. The model
folder comes from `TELEGUARD_CLASSIFIER_MODEL`, because the reward runs inside the ms-swift trainer process;
it is loaded once per process.

**Evaluation** (`classifier_reward_stats`, `reward_stats_markdown`): the reward's mean, spread, min and max over a
model's is_fraud whole-call predictions, so a report can show the reward before and after RL.

The classifier's training rows and `swift sft` options are training code: `teleguard.train.classifier`. It
trains with the labels and the default length below, so the reward scores text as it was trained.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from teleguard.contract.labels import FRAUD, NORMAL, Round, Stage
from teleguard.contract.parser import parse_output
from teleguard.rewards.common import CORRECT, column
from teleguard.rewards.log import record

__all__ = [
    "CLASSIFIER_DEVICE_ENV",
    "CLASSIFIER_ENV",
    "CLASSIFIER_MODEL_ENV",
    "DEFAULT_MAX_LENGTH",
    "FRAUD_LABEL",
    "NORMAL_LABEL",
    "FraudClassifier",
    "classifier_reward_stats",
    "classifier_rewards",
    "fraud_classifier",
    "get_classifier",
    "reward_stats_markdown",
]

CLASSIFIER_MODEL_ENV = "TELEGUARD_CLASSIFIER_MODEL"  # the trained classifier folder the reward loads
CLASSIFIER_ENV = CLASSIFIER_MODEL_ENV  # the same variable, by the name the stage runner uses
CLASSIFIER_DEVICE_ENV = "TELEGUARD_CLASSIFIER_DEVICE"  # optional: "cpu", "cuda", "cuda:1" (default: auto)
FRAUD_LABEL, NORMAL_LABEL = 1, 0
DEFAULT_MAX_LENGTH = 1024

# ------------------------------------------------------------------------------------------------- classifier


class FraudClassifier:
    """A trained seq-cls model folder: `prob_fraud(texts)` is P(label 1 = fraud) for each text.

    Loads with AutoModelForSequenceClassification and the folder's tokenizer, in eval mode, on `device` (default:
    TELEGUARD_CLASSIFIER_DEVICE, else this rank's GPU when there is one, else the CPU). The text is tokenized
    bare, as `teleguard.train.classifier` trains it, and truncated to `max_length` tokens from the left
    (default: the max_length in the folder's ms-swift args.json, else 1024).
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
    n = len(completions)
    answers = column(columns, "answers", n, "fraud_classifier")
    tasks = column(columns, "task", n, "fraud_classifier") if columns.get("task") is not None else None
    values = classifier_rewards(get_classifier(), completions, answers, tasks)
    record("fraud_classifier", [parse_output(c) for c in completions], values, answers=answers)
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
