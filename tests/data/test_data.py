"""Call data: ingestion, timing, prefixes, round samples, splits and dataset building."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teleguard.cli import app
from teleguard.contract import Stage, builtin_prompts, format_answer, parse_output
from teleguard.data.dataset import build_split, read_calls, write_calls
from teleguard.data.ingest import IngestError, ingest
from teleguard.data.prefixes import PrefixPolicy, cut_prefixes
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.data.rounds import RowBuilder, Sample, sample_of_call
from teleguard.data.splits import SplitSpec, split_calls
from teleguard.data.timing import SpeechRate, estimate_times
from teleguard.rewards import REWARDS
from tests.support.paths import TRANSCRIPTS_DIR


@pytest.fixture(scope="module")
def dialogue_files() -> list[Path]:
    files = sorted(TRANSCRIPTS_DIR.glob("*_dialogues-*.jsonl"))
    if not files:
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    return files


@pytest.fixture(scope="module")
def all_calls(dialogue_files: list[Path]) -> list[CallRecord]:
    calls, report = ingest(dialogue_files, "dialogues")
    assert not report.rejected
    return calls


def dialogue_row(tts_id: str = "tts_1", **over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "tts_id": tts_id,
        "left": ["您好，这里是银行客服，您的账户有异常。", "请提供验证码。"],
        "right": ["什么异常？", ""],
        "fraud_type": "银行诈骗",
        "user_age": 30,
        "user_awareness": "中",
        "occupation": "教师",
    }
    row.update(over)
    return row


# ----------------------------------------------------------------------------------------------- ingestion


def test_every_shared_dialogue_is_accepted_with_source_label_counts(dialogue_files, all_calls) -> None:
    source: Counter[tuple[bool, str]] = Counter()
    for path in dialogue_files:
        for line in path.read_text("utf-8").splitlines():
            source[(path.name.startswith("fraud"), json.loads(line)["fraud_type"])] += 1
    ingested = Counter((c.labels.is_fraud, c.labels.fraud_type or c.labels.scene) for c in all_calls)
    assert ingested == source
    assert len(all_calls) == sum(source.values()) == 7942
    assert all(c.turns and c.timed is False for c in all_calls)  # times come from the timing step


def test_same_tts_id_in_two_files_stays_two_calls(dialogue_files, all_calls) -> None:
    by_tts = Counter(c.meta["tts_id"] for c in all_calls)
    shared_id, count = by_tts.most_common(1)[0]
    assert count >= 2
    ids = [c.call_id for c in all_calls if c.meta["tts_id"] == shared_id]
    assert len(set(ids)) == count and all(i.endswith("/" + shared_id) for i in ids)


def test_empty_utterances_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "fraud_dialogues-x.jsonl"
    path.write_text(json.dumps(dialogue_row(), ensure_ascii=False) + "\n", "utf-8")
    [call], _ = ingest([path], "dialogues")
    assert [t.speaker for t in call.turns] == ["left", "right", "left"]
    assert call.meta["dropped_empty_turns"] == 1
    assert call.callee is not None and call.callee.age == 30
    assert call.labels == CallLabels(is_fraud=True, fraud_type="银行诈骗")


MALFORMED = [
    ("bad JSON", '{"tts_id": "x", "left": [', ""),
    ("missing field", json.dumps({k: v for k, v in dialogue_row("m").items() if k != "left"}), "left"),
    ("unknown label", json.dumps(dialogue_row("u", fraud_type="外星诈骗"), ensure_ascii=False), "fraud_type"),
    ("empty turns", json.dumps(dialogue_row("e", left=[], right=[]), ensure_ascii=False), "left"),
    ("blank turns", json.dumps(dialogue_row("b", left=[" "], right=[""]), ensure_ascii=False), "left"),
    ("wrong type", json.dumps(dialogue_row("w", left="一句话"), ensure_ascii=False), "left"),
    ("wrong nested type", json.dumps(dialogue_row("n", right=["好", 3]), ensure_ascii=False), "right.1"),
    ("wrong age type", json.dumps(dialogue_row("a", user_age="三十"), ensure_ascii=False), "user_age"),
    ("duplicate id", json.dumps(dialogue_row("good1"), ensure_ascii=False), "call_id"),
]


def write_malformed(tmp_path: Path) -> Path:
    path = tmp_path / "fraud_dialogues-bad.jsonl"
    lines = [json.dumps(dialogue_row("good1"), ensure_ascii=False)]
    for _, text, _ in MALFORMED:
        lines.append(text)
        lines.append(json.dumps(dialogue_row(f"good{len(lines)}"), ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def test_each_malformed_row_is_reported_with_line_and_field(tmp_path: Path) -> None:
    path = write_malformed(tmp_path)
    calls, report = ingest([path], "dialogues", on_error="skip")
    assert len(calls) == len(MALFORMED) + 1  # every good row around the bad ones survives
    assert report.accepted == len(calls) and len(report.rejected) == len(MALFORMED)
    for (kind, _, field), rejection in zip(MALFORMED, report.rejected, strict=True):
        assert rejection.path == str(path)
        assert rejection.field == field, kind
        assert str(rejection).startswith(f"{path}:{rejection.line}: "), kind
    assert [r.line for r in report.rejected] == list(range(2, 2 * len(MALFORMED) + 1, 2))
    assert report.per_file[str(path)] == {"accepted": len(calls), "rejected": len(MALFORMED)}


def test_fail_mode_reports_every_rejection(tmp_path: Path) -> None:
    path = write_malformed(tmp_path)
    with pytest.raises(IngestError) as err:
        ingest([path], "dialogues")
    assert err.value.report.accepted == len(MALFORMED) + 1
    assert f"{len(MALFORMED)} row(s) rejected" in str(err.value)
    assert f"{path}:2: " in str(err.value)


def test_sft_release_rows(tmp_path: Path) -> None:
    def turn(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    rows = [
        {
            "messages": [
                turn("user", "<audio>场景？"),
                turn("assistant", format_answer("scene", "外卖服务", think="外卖")),
                turn("user", "诈骗？"),
                turn("assistant", format_answer("is_fraud", False, think="正常")),
            ],
            "audios": ["a/1.wav"],
        },
        {
            "messages": [turn("user", "<audio>诈骗？"), turn("assistant", format_answer("is_fraud", True))],
            "audios": ["a/2.wav"],
        },
        {"messages": [turn("user", "<audio>?")], "audios": ["a/3.wav"]},  # odd number of messages
        {"messages": [turn("user", "x"), turn("assistant", "no answer")], "audios": ["a/4.wav"]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    calls, report = ingest([path], "sft", on_error="skip")
    assert [c.labels for c in calls] == [
        CallLabels(is_fraud=False, scene="外卖服务"),
        CallLabels(is_fraud=True),
    ]
    assert calls[0].audio == str(tmp_path / "a" / "1.wav") and not calls[0].turns  # relative to the file
    assert [(r.line, r.field) for r in report.rejected] == [(3, "messages"), (4, "messages.1.content")]


def test_binary_classification_json(tmp_path: Path) -> None:
    rows = [
        {"audio": "x/1.wav", "label": 1},
        {"audio_path": "x/2.wav", "label": "正常"},
        {"path": "x/3.wav", "is_fraud": True},
        {"audio": "x/4.wav", "label": "不正常"},  # must not be read as 正常
        {"label": 0},
    ]
    path = tmp_path / "binary_test.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    calls, report = ingest([path], "binary", on_error="skip")
    assert [c.labels.is_fraud for c in calls] == [True, False, True]
    assert [(r.line, r.field) for r in report.rejected] == [(4, "label"), (5, "audio")]


def test_teleguard_format_round_trip(tmp_path: Path, all_calls) -> None:
    calls = [estimate_times(c) for c in all_calls[:50]]
    write_calls(tmp_path / "calls", calls)
    assert read_calls(tmp_path / "calls") == calls
    card = json.loads((tmp_path / "calls" / "card.json").read_text("utf-8"))
    assert card["calls"] == 50 and sum(card["per_label"].values()) == 50
    assert card["duration_s"]["timed_calls"] == 50


# ------------------------------------------------------------------------------------------ timing, prefixes


def call_of(n_turns: int, *, is_fraud: bool = True) -> CallRecord:
    turns = tuple(Turn(speaker="left" if i % 2 == 0 else "right", text="字" * 9) for i in range(n_turns))
    labels = (
        CallLabels(is_fraud=True, fraud_type="投资诈骗")
        if is_fraud
        else CallLabels(is_fraud=False, scene="打车服务")
    )
    return CallRecord(call_id=f"c{n_turns}", source="test", turns=turns, labels=labels)


def test_estimated_times_follow_the_speech_rate() -> None:
    rate = SpeechRate(cjk_chars_per_s=3.0, gap_s=0.5)
    timed = estimate_times(call_of(4), rate)
    assert [(t.start, t.end) for t in timed.turns] == [(0.0, 3.0), (3.5, 6.5), (7.0, 10.0), (10.5, 13.5)]
    assert timed.duration == 13.5 and timed.meta["times"] == "estimated"
    assert estimate_times(timed, SpeechRate(cjk_chars_per_s=1.0)) is timed  # already timed: unchanged


def test_prefix_stages_on_a_known_call() -> None:
    # 10 equal turns of 3 s with 0.5 s gaps: turn k ends at 3.5k - 0.5; the call lasts 34.5 s.
    call = estimate_times(call_of(10), SpeechRate(cjk_chars_per_s=3.0, gap_s=0.5))
    every = cut_prefixes(call, PrefixPolicy(per_stage=None, early_until=0.4))
    assert [p.turns for p in every] == list(range(1, 11))  # from the caller's opening on
    assert [p.turns for p in cut_prefixes(call, PrefixPolicy(per_stage=None, min_turns=2))] == list(
        range(2, 11)
    )
    stages = {p.turns: p.stage for p in every}
    assert all(stages[k] == Stage.EARLY for k in (1, 2, 3, 4))  # ends at <= 13.8 s = 40 % of 34.5 s
    assert all(stages[k] == Stage.LATE for k in range(5, 10))
    assert stages[10] == Stage.COMPLETE and every[-1].call == call
    assert every[2].end_s == 10.0 and len(every[2].call.turns) == 3 and every[2].call.labels == call.labels
    sampled = cut_prefixes(call, PrefixPolicy(per_stage=1))
    assert [p.stage for p in sampled] == [Stage.EARLY, Stage.LATE, Stage.COMPLETE]
    assert sampled == cut_prefixes(call, PrefixPolicy(per_stage=1))  # deterministic per call id


# ----------------------------------------------------------------------------------------------- round rows


def test_round_structure_for_fraud_and_normal_calls() -> None:
    builder = RowBuilder(builtin_prompts("zh"), "offline", "text", chain_scene=True)  # SAFE-QAQ's chaining
    fraud = builder.grpo_rows(sample_of_call(estimate_times(call_of(3))))
    assert [(r["task"], r["answers"]) for r in fraud] == [("is_fraud", "fraud"), ("fraud_type", "投资诈骗")]
    assert [m["role"] for m in fraud[1]["messages"]] == ["system", "user", "assistant", "user"]
    normal = builder.grpo_rows(sample_of_call(estimate_times(call_of(3, is_fraud=False))))
    assert [(r["task"], r["answers"]) for r in normal] == [("scene", "打车服务"), ("is_fraud", "normal")]
    first, second = normal
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][:2] == first["messages"]  # the later round sees the earlier one
    assert parse_output(second["messages"][2]["content"]).label == "打车服务"
    assert second["messages"][3]["content"].startswith(builtin_prompts("zh").follow_up)
    assert "左：" in first["messages"][1]["content"] and "左：" not in second["messages"][3]["content"]
    assert first["conversation_stage"] == "complete" and first["call_id"] == "c3" and first["audio_idx"] == 3


def test_unchained_is_fraud_rows_have_the_same_shape_for_both_labels() -> None:
    # Fraud transcripts carry no scene: chaining is_fraud onto a scene round only for normal calls would let
    # the number of messages give the label away.
    builder = RowBuilder(builtin_prompts("zh"), "offline", "text")
    rows = builder.grpo_rows(sample_of_call(estimate_times(call_of(3, is_fraud=False))))
    rows += builder.grpo_rows(sample_of_call(estimate_times(call_of(3))))
    shapes = {r["answers"]: [m["role"] for m in r["messages"]] for r in rows if r["task"] == "is_fraud"}
    assert shapes == {"normal": ["system", "user"], "fraud": ["system", "user"]}
    fraud_type = next(r for r in rows if r["task"] == "fraud_type")
    assert len(fraud_type["messages"]) == 4  # the fraud type still builds on the is_fraud round
    sft = builder.sft_rows(sample_of_call(estimate_times(call_of(3, is_fraud=False))))
    assert [len(r["messages"]) for r in sft] == [3, 3]  # scene and is_fraud asked in their own conversations


def test_build_chains_only_when_every_call_has_a_scene(tmp_path: Path) -> None:
    normal = [estimate_times(call_of(3, is_fraud=False))]
    assert build_split(normal, tmp_path / "a")["chain_scene"] is True
    mixed = [*normal, estimate_times(call_of(4))]
    assert build_split(mixed, tmp_path / "b")["chain_scene"] is False


def test_transcript_cut_and_evidence_in_reasoning() -> None:
    builder = RowBuilder(builtin_prompts("zh"), "offline", "text", max_transcript_chars=12, evidence_chars=5)
    call = estimate_times(call_of(3))
    [row] = builder.sft_rows(sample_of_call(call))
    assert call.transcript()[:12] in row["messages"][1]["content"]
    assert call.transcript()[:13] not in row["messages"][1]["content"]
    think = parse_output(row["messages"][2]["content"]).think
    # the caller's words, cut to evidence_chars, open the reasoning
    assert think is not None and think.startswith(builtin_prompts("zh").evidence("字字字字字"))
    assert "字字字字字字" not in think


def test_reference_answers_earn_full_rewards() -> None:
    # an early prefix with evidence gets labelled targets for both rounds; one without gets a null is_fraud
    # ("information insufficient") and no fraud-type round, as the detector asks it only after a fraud answer
    plain = estimate_times(call_of(6))
    turns = (Turn(speaker="left", text="请您提供验证码，马上转账到安全账户"), *plain.turns[1:])
    telling = estimate_times(call_of(6).model_copy(update={"turns": turns}))
    for call, rounds in ((telling, 2), (plain, 1)):
        prefix = cut_prefixes(call)[0]
        assert prefix.stage == Stage.EARLY
        sample = Sample(prefix.call, prefix.parent_id, prefix.stage, prefix.turns, prefix.end_s)
        rows = RowBuilder(builtin_prompts("en"), "realtime", "text").grpo_rows(sample)
        [sft] = RowBuilder(builtin_prompts("en"), "realtime", "text").sft_rows(sample)
        targets = [m["content"] for m in sft["messages"] if m["role"] == "assistant"]
        assert len(targets) == rounds
        columns = {
            "answers": [r["answers"] for r in rows[:rounds]],
            "conversation_stage": [r["conversation_stage"] for r in rows[:rounds]],
        }
        assert REWARDS["prompt_format"](targets) == [1.0] * rounds
        assert REWARDS["adaptive_classification"](targets, **columns) == [5.0] * rounds
        assert REWARDS["stage_classification"](targets, **columns) == [5.0] * rounds
        assert parse_output(targets[0]).insufficient is (rounds == 1)


def test_audio_rows_put_one_audio_tag_per_clip() -> None:
    builder = RowBuilder(builtin_prompts("zh"), "offline", "audio")
    call = estimate_times(call_of(3))
    rows = builder.grpo_rows(sample_of_call(call, clips=["a.wav", "b.wav"]))
    assert rows[0]["audios"] == ["a.wav", "b.wav"]
    assert rows[0]["messages"][1]["content"].count("<audio>") == 2
    assert "左：" not in rows[0]["messages"][1]["content"]
    with pytest.raises(ValueError, match="needs audio clips"):
        builder.grpo_rows(sample_of_call(call))


# --------------------------------------------------------------------------------------------------- splits


def test_splits_are_deterministic_stratified_and_disjoint(all_calls) -> None:
    shuffled = list(reversed(all_calls))
    a, b = split_calls(all_calls), split_calls(shuffled)
    assert {k: [c.call_id for c in v] for k, v in a.items()} == {
        k: [c.call_id for c in v] for k, v in b.items()
    }
    ids = {k: {c.call_id for c in v} for k, v in a.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["dev"] and not ids["dev"] & ids["test"]
    assert sum(map(len, ids.values())) == len(all_calls)
    for label, total in Counter(c.labels.name for c in all_calls).items():
        in_test = sum(c.labels.name == label for c in a["test"])
        assert abs(in_test - 0.1 * total) <= 1, label
    other = split_calls(all_calls, SplitSpec(seed=1))
    assert {c.call_id for c in other["test"]} != ids["test"]
    with pytest.raises(ValueError, match="must be 1"):
        SplitSpec(train=0.9, dev=0.1, test=0.1)


def test_built_datasets_keep_test_calls_out_of_training(tmp_path: Path, all_calls) -> None:
    subset = [c for i, c in enumerate(all_calls) if i % 40 == 0]
    parts = split_calls(subset)
    for name in ("train", "test"):
        build_split(parts[name], tmp_path / name)
    train_ids = {
        json.loads(line)["call_id"]
        for file in ("grpo.jsonl", "realtime.jsonl")
        for line in (tmp_path / "train" / file).read_text("utf-8").splitlines()
    }
    test_ids = {
        json.loads(line)["call_id"]
        for line in (tmp_path / "test" / "realtime.jsonl").read_text("utf-8").splitlines()
    }
    assert train_ids == {c.call_id for c in parts["train"]} and test_ids <= {c.call_id for c in parts["test"]}
    assert not train_ids & test_ids
    card = json.loads((tmp_path / "train" / "card.json").read_text("utf-8"))
    # offline: one conversation per call, two for calls with a scene (scene and is_fraud are asked separately);
    # as many real-time rows again, from one streaming prefix per call (the default)
    conversations = len(parts["train"]) + sum(c.labels.scene is not None for c in parts["train"])
    assert card["rows"]["sft_rows"] - card["rows"]["sft_realtime_rows"] == conversations
    assert card["rows"]["sft_realtime_rows"] == conversations
    assert sum(card["sft_realtime_prefixes_per_stage"].values()) == len(parts["train"])
    assert set(card["realtime_rows_per_stage"]) == {"early_stage", "late_stage", "complete"}


def test_cli_sequence_from_transcripts_to_datasets(tmp_path: Path, dialogue_files) -> None:
    runner = CliRunner()
    normal = [p for p in dialogue_files if p.name.startswith("normal")]
    result = runner.invoke(app, ["data", "ingest", *map(str, normal), "--out", str(tmp_path / "calls")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "split", str(tmp_path / "calls"), "--out", str(tmp_path / "splits")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "build", str(tmp_path / "splits"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    for split in ("train", "dev", "test"):
        for file in ("sft.jsonl", "grpo.jsonl", "realtime.jsonl", "card.json", "card.md"):
            assert (tmp_path / "ds" / split / file).stat().st_size > 0
    row = json.loads((tmp_path / "ds" / "dev" / "grpo.jsonl").read_text("utf-8").splitlines()[0])
    assert {
        "messages",
        "answers",
        "conversation_stage",
        "task",
        "call_id",
        "audio_idx",
        "audio_length",
    } <= set(row)


def test_cli_ingest_reports_bad_rows(tmp_path: Path) -> None:
    path = write_malformed(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "ingest", str(path), "--out", str(tmp_path / "calls")])
    assert result.exit_code == 2 and f"{path}:4: field 'left'" in result.output
    assert not (tmp_path / "calls").exists()
    result = runner.invoke(app, ["data", "ingest", str(path), "--skip", "--out", str(tmp_path / "calls")])
    assert result.exit_code == 0 and "10 calls accepted, 9 rejected" in result.output
    assert len(read_calls(tmp_path / "calls")) == 10


def test_audio_modality_from_synthesized_calls(tmp_path: Path) -> None:
    from teleguard.data.audio import read_audio, synthesize_call
    from teleguard.data.audio_clips import ClipWriter

    # a call long enough (about 40 s of speech) to need two clips when whole
    turns = tuple(
        Turn(speaker="left" if i % 2 == 0 else "right", text="您好，请问您需要什么帮助？" * 3)
        for i in range(6)
    )
    call = CallRecord(
        call_id="a/1", source="test", turns=turns, labels=CallLabels(is_fraud=False, scene="咨询客服")
    )
    voiced = synthesize_call(call, tmp_path / "audio" / "a1.wav")
    write_calls(tmp_path / "calls", [voiced])
    [loaded] = read_calls(tmp_path / "calls")
    assert Path(loaded.audio).is_file() and loaded.turns == voiced.turns
    build_split([loaded], tmp_path / "ds", modality="audio", clip_maker=ClipWriter(tmp_path / "ds"))
    rows = [json.loads(x) for x in (tmp_path / "ds" / "realtime.jsonl").read_text("utf-8").splitlines()]
    assert {r["conversation_stage"] for r in rows} == {"early_stage", "late_stage", "complete"}
    for row in rows:
        assert all(not Path(p).is_absolute() for p in row["audios"])  # relative to the dataset folder
        clips = [read_audio(tmp_path / "ds" / p)[0] for p in row["audios"]]
        assert all(len(c) <= 30 * 16000 for c in clips)
        assert sum(len(c) for c in clips) == pytest.approx(
            row["audio_length"] * 16000, abs=16
        )  # audio_length is in ms
        assert row["messages"][1]["content"].count("<audio>") == len(clips)
    assert max(len(r["audios"]) for r in rows) >= 2


def test_built_dataset_round_trips_through_s3_with_checksums(
    tmp_path: Path, dialogue_files, s3_endpoint, monkeypatch
) -> None:
    from teleguard import storage

    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "teleguard-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret/123")
    monkeypatch.setenv("TELEGUARD_STORAGE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    normal = [str(p) for p in dialogue_files if p.name.startswith("normal")]
    steps = [
        ["data", "ingest", *normal, "--out", "s3://teleguard-data/calls"],
        ["data", "split", "s3://teleguard-data/calls", "--out", "minio://teleguard-data/splits", "--dev", "0.5",
         "--test", "0.3", "--train", "0.2"],
        ["data", "build", "s3://teleguard-data/splits", "--out", "s3://teleguard-data/datasets/text"],
    ]  # fmt: skip
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "not-a-real-secret" not in result.output
    manifest = storage.verify("s3://teleguard-data/datasets/text")
    assert {"train/grpo.jsonl", "dev/realtime.jsonl", "test/card.json"} <= {f.path for f in manifest.files}
    local = storage.get_dir("s3://teleguard-data/datasets/text", tmp_path / "copy")
    dev_rows = [
        json.loads(x) for x in (tmp_path / "copy" / "dev" / "sft.jsonl").read_text("utf-8").splitlines()
    ]
    offline = [r for r in dev_rows if r["mode"] == "offline"]  # one chained conversation per call
    assert abs(len(offline) - 1977 * 0.5) <= 7  # half of each of the 7 scenes, rounded per scene
    assert local.files == manifest.files

    # corrupt one object behind the manifest's back: both checks name it
    target = storage.Storage.from_uri("s3://teleguard-data/datasets/text")
    target.write_bytes("dev/grpo.jsonl", b'{"tampered": true}\n')
    with pytest.raises(storage.ChecksumError, match=r"dev/grpo\.jsonl"):
        storage.verify("s3://teleguard-data/datasets/text")
    with pytest.raises(storage.ChecksumError, match=r"dev/grpo\.jsonl"):
        storage.get_dir("s3://teleguard-data/datasets/text", tmp_path / "copy2")


def test_split_order_mixes_the_labels(all_calls) -> None:
    test = split_calls(all_calls)["test"]
    first = [c.labels.is_fraud for c in test[:40]]
    assert 0 < sum(first) < 40  # not one class first: a stage that reads the first N rows sees both
