"""The fraud-classifier reward (seed 002): its dataset, a real `swift sft --task_type seq_cls` run on a tiny Qwen2,
the classifier it produces, the reward through the registry, and its evaluation statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from teleguard.contract import Mode, Round, builtin_prompts, parse_output
from teleguard.evaluate.metrics import RoundPrediction
from teleguard.rewards import CORRECT, REWARDS, classifier
from teleguard.rewards.classifier import (
    CLASSIFIER_MODEL_ENV,
    FraudClassifier,
    classifier_reward_stats,
    classifier_rewards,
    reward_stats_markdown,
)
from teleguard.tiny_models import build_tiny_model
from teleguard.train.classifier import (
    DROP_FOR_SEQ_CLS,
    classifier_rows,
    train_classifier_args,
    transcript_of,
    write_classifier_dataset,
)
from teleguard.train.stages import TRAINING_STATE, latest_checkpoint
from teleguard.train.swift import CPU_OPTIONS, flags, run_swift


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def gold_by_call(split: Path) -> dict[str, str]:
    return {r["call_id"]: r["answers"] for r in read_jsonl(split / "grpo.jsonl") if r["task"] == "is_fraud"}


def reference_answers(split: Path) -> dict[str, str]:
    """call_id -> the reference is_fraud answer (think + answer) of the split's whole-call SFT targets (the
    call's first is_fraud target; its real-time rows follow it)."""
    found: dict[str, str] = {}
    for row in read_jsonl(split / "sft.jsonl"):
        for m in row["messages"]:
            if m["role"] == "assistant" and parse_output(m["content"]).round is Round.FRAUD:
                found.setdefault(row["call_id"], m["content"])
    return found


# ---------------------------------------------------------------------------------------------------- dataset


def test_rows_are_labelled_right_balanced_and_deterministic(text_datasets: Path) -> None:
    split = text_datasets / "train"
    rows = classifier_rows(split, None)
    gold = gold_by_call(split)
    references = reference_answers(split)
    assert {r["call_id"] for r in rows} == set(gold)  # every call of the is_fraud round
    for row in rows:
        assert set(row) >= {"messages", "label"}
        assert row["messages"] == [{"role": "user", "content": row["messages"][0]["content"]}]
        assert row["label"] == (1 if gold[row["call_id"]] == "fraud" else 0)
        text = row["messages"][0]["content"]
        if row["kind"] == "reasoning":  # the reference reasoning of the call's verdict, the call's own
            assert text == parse_output(references[row["call_id"]]).think
        else:  # the transcript, without the prompt's instructions
            assert text.startswith(("左：", "右：")) and "<think>" not in text and "请判断" not in text
    labels = [r["label"] for r in rows]
    assert labels.count(1) == labels.count(0) == len(rows) // 2
    assert labels[:4] == [1, 0, 1, 0]  # the labels alternate
    assert sorted(r["kind"] for r in rows).count("reasoning") == len(gold)
    assert classifier_rows(split, None) == rows

    counts = write_classifier_dataset(split, split.parent / "classifier-limit5.jsonl", 5)
    assert counts == {"rows": 5, "fraud": 3, "normal": 2, "calls": 3, "reasoning": 3, "transcript": 2}


def test_an_unbalanced_split_is_cut_to_its_smaller_class(text_datasets: Path, tmp_path: Path) -> None:
    source = text_datasets / "train"
    gold = gold_by_call(source)
    fraud_calls = sorted(c for c, g in gold.items() if g == "fraud")[:2]
    keep = [
        r
        for r in read_jsonl(source / "sft.jsonl")
        if gold.get(r["call_id"]) == "normal" or r["call_id"] in fraud_calls
    ]
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), "utf-8"
    )
    counts = write_classifier_dataset(tmp_path, tmp_path / "classifier.jsonl", None)
    assert counts["fraud"] == counts["normal"] == 4 and counts["calls"] == 4


def test_transcript_of_reads_the_call_out_of_any_builtin_prompt() -> None:
    transcript = "左：您好，这里是银行。\n右：你好。"
    for language in ("zh", "en"):
        prompts = builtin_prompts(language)
        for mode in Mode:
            for round_ in Round:
                assert transcript_of(prompts.user_prompt(round_, mode, transcript=transcript)) == transcript
        assert transcript_of(prompts.user_prompt(Round.FRAUD, audio=True)) is None  # an audio prompt has none
    assert transcript_of("custom header\n左：喂\n右：哪位\nquestion?") == "左：喂\n右：哪位"


def test_train_args_are_the_seq_cls_flags_over_the_common_options(tmp_path: Path) -> None:
    common = {"tuner_type": "lora", "max_length": 2048, "enable_thinking": False, "seed": 1}
    options = train_classifier_args(tmp_path / "c.jsonl", common)
    assert not set(DROP_FOR_SEQ_CLS) & set(options)
    assert options["tuner_type"] == "lora" and options["seed"] == 1 and options["max_length"] == 2048
    assert flags({k: options[k] for k in ("task_type", "num_labels", "use_chat_template")}) == [
        "--task_type", "seq_cls", "--num_labels", "2", "--use_chat_template", "false",
    ]  # fmt: skip
    assert options["truncation_strategy"] == "left"
    assert train_classifier_args(tmp_path / "c.jsonl")["max_length"] == 1024


# ------------------------------------------------------------------------------------------ trained classifier


@pytest.fixture(scope="module")
def classifier_model(text_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 trained as a fraud classifier by a real `swift sft --task_type seq_cls` run (~10 s)."""
    work = tmp_path_factory.mktemp("classifier")
    dataset = work / "classifier.jsonl"
    write_classifier_dataset(text_datasets / "train", dataset, None)
    corpus = [r["messages"][0]["content"] for r in read_jsonl(dataset)]
    base = build_tiny_model(work / "base", "qwen2", corpus * 4, vocab_size=1024, hidden_size=32)
    common = {"tuner_type": "full", "seed": 42, "save_steps": 1000, "logging_steps": 5, "split_dataset_ratio": 0,
              "add_version": False, "gradient_checkpointing": False, "enable_thinking": False, **CPU_OPTIONS}  # fmt: skip
    options = train_classifier_args(dataset, common, max_length=256)
    options.update(
        learning_rate=1e-3,
        max_steps=30,
        per_device_train_batch_size=4,
        warmup_ratio=0.0,
        output_dir=work / "train",
    )
    run_swift("sft", [*base.swift_args(), *flags(options)], log_path=work / "sft.log")
    checkpoint = latest_checkpoint(work / "train")
    assert checkpoint is not None
    model = work / "model"  # what the stage runner keeps: the checkpoint without its trainer state
    shutil.copytree(checkpoint, model, ignore=shutil.ignore_patterns(*TRAINING_STATE))
    return model


@pytest.fixture
def with_classifier(classifier_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CLASSIFIER_MODEL_ENV, str(classifier_model))
    return classifier_model


def test_the_trained_folder_loads_and_batches_like_single_texts(classifier_model: Path) -> None:
    model = FraudClassifier(classifier_model, batch_size=4)
    assert model.max_length == 256  # from the run's args.json
    assert model.model.config.num_labels == 2
    texts = ["左：请把验证码告诉我。", "", "正常的订餐电话。" * 40, "通话是正常的业务沟通。", "诈骗"]
    batched = model.prob_fraud(texts)
    single = [model.prob_fraud([t])[0] for t in texts]
    assert all(0.0 <= p <= 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-4)  # padding does not change a text's probability


def test_reward_through_the_registry(with_classifier: Path, text_datasets: Path) -> None:
    split = text_datasets / "test"
    answers = reference_answers(split)
    rows = read_jsonl(split / "grpo.jsonl")
    completions = [answers[r["call_id"]] for r in rows]
    columns = {key: [r[key] for r in rows] for key in ("answers", "task", "conversation_stage")}
    values = REWARDS["fraud_classifier"](completions, **columns)
    assert len(values) == len(rows)
    for row, value in zip(rows, values, strict=True):
        if row["task"] == "is_fraud":
            assert 0.0 <= value <= CORRECT
        else:
            assert value == 0.0  # the classifier knows only fraud vs normal
    assert classifier.get_classifier() is classifier.get_classifier()  # loaded once per process

    # without a <think> block the whole completion is read
    bare = '<answer>{"is_fraud": true}</answer>'
    model = classifier.get_classifier()
    value = REWARDS["fraud_classifier"]([bare], answers=["fraud"], task=["is_fraud"])[0]
    assert value == pytest.approx(CORRECT * model.prob_fraud([bare])[0])
    # without a task column, fraud/normal gold marks the is_fraud round
    assert REWARDS["fraud_classifier"]([bare, bare], answers=["normal", "银行诈骗"]) == [
        pytest.approx(CORRECT * (1 - model.prob_fraud([bare])[0])),
        0.0,
    ]


def test_a_missing_classifier_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reward = REWARDS["fraud_classifier"]
    monkeypatch.delenv(CLASSIFIER_MODEL_ENV, raising=False)
    with pytest.raises(ValueError, match=CLASSIFIER_MODEL_ENV):
        reward(["<think>x</think>"], answers=["fraud"], task=["is_fraud"])
    monkeypatch.setenv(CLASSIFIER_MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_MODEL_ENV}=.*nowhere"):
        reward(["<think>x</think>"], answers=["fraud"], task=["is_fraud"])
    with pytest.raises(ValueError, match="answers"):
        reward(["<think>x</think>"], task=["is_fraud"])


def test_the_classifier_rewards_reasoning_for_the_right_verdict(
    with_classifier: Path, text_datasets: Path
) -> None:
    """Held-out reference reasonings score higher against their own gold label than against the wrong one."""
    split = text_datasets / "test"
    gold = gold_by_call(split)
    answers = reference_answers(split)
    calls = sorted(gold)
    completions = [answers[c] for c in calls]
    right = [gold[c] for c in calls]
    wrong = ["normal" if g == "fraud" else "fraud" for g in right]
    task = ["is_fraud"] * len(calls)
    right_mean = np.mean(REWARDS["fraud_classifier"](completions, answers=right, task=task))
    wrong_mean = np.mean(REWARDS["fraud_classifier"](completions, answers=wrong, task=task))
    assert right_mean > wrong_mean + 1.0, (right_mean, wrong_mean)


def test_reward_stats_match_numpy(classifier_model: Path, text_datasets: Path) -> None:
    split = text_datasets / "test"
    answers = reference_answers(split)
    rows = read_jsonl(split / "grpo.jsonl")
    predictions = [
        RoundPrediction(call_id=r["call_id"], task=r["task"], gold=r["answers"], output=answers[r["call_id"]])
        for r in rows
    ]
    # a wrong verdict's reasoning for some calls, so the values spread; and a prefix, which is left out
    predictions += [
        RoundPrediction(call_id="x", task="is_fraud", gold="normal", output=answers[rows[0]["call_id"]]),
        RoundPrediction(call_id="y", task="is_fraud", gold="fraud", output="<think>", stage="early_stage"),
    ]
    stats = classifier_reward_stats(classifier_model, predictions)
    chosen = [p for p in predictions if p.task == "is_fraud" and p.stage == "complete"]
    values = np.array(
        classifier_rewards(
            FraudClassifier(classifier_model), [p.output for p in chosen], [p.gold for p in chosen]
        )
    )
    assert stats["n"] == len(chosen) == sum(r["task"] == "is_fraud" for r in rows) + 1
    assert stats["mean"] == pytest.approx(values.mean(), abs=1e-5)
    assert stats["std"] == pytest.approx(values.std(), abs=1e-5)
    assert stats["std"] > 0
    assert stats["min"] == pytest.approx(values.min(), abs=1e-5)
    assert stats["max"] == pytest.approx(values.max(), abs=1e-5)
    assert classifier_reward_stats(classifier_model, []) == {
        "mean": None, "std": None, "min": None, "max": None, "n": 0,
    }  # fmt: skip

    table = reward_stats_markdown({"sft": stats, "grpo": {"mean": None, "std": None, "n": 0}})
    lines = table.splitlines()
    assert lines[0] == "| model | mean | std | n |"
    assert lines[2] == f"| sft | {stats['mean']:.3f} | {stats['std']:.3f} | {stats['n']} |"
    assert lines[3] == "| grpo | – | – | 0 |"
