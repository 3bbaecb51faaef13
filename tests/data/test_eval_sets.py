"""Evaluation sets: each transformation on real held-out calls, their files in a built dataset folder, and the
per-set results in evaluation reports."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teleguard.cli import app
from teleguard.contract import format_answer
from teleguard.data.dataset import build_datasets, build_eval_sets, write_calls
from teleguard.data.eval_sets import (
    AUDIO_SETS,
    CODE_SWITCH,
    EVAL_SETS,
    EVAL_SETS_DIR,
    FRAUD_WORDS,
    SERVICE_SCENES,
    check_names,
    code_switch_text,
    make_eval_sets,
)
from teleguard.data.ingest import ingest
from teleguard.data.records import CallRecord
from teleguard.data.splits import split_calls
from teleguard.engines import Prompt, SamplingParams
from teleguard.evaluate import RoundPrediction, evaluate_predictions, write_report
from teleguard.evaluate.run import evaluate_models, read_eval_rows, read_eval_sets
from tests.support.paths import TRANSCRIPTS_DIR

SIZE = 32
TAGS = {
    "gold": "gold",
    "disguised_opening": "rt-opening",
    "fraud_words_in_normal": "rt-words",
    "code_switching": "rt-code",
    "very_short": "rt-short",
}


@pytest.fixture(scope="module")
def test_calls() -> list[CallRecord]:
    """The held-out split of every shared call (about 800 calls, all fraud types and scenes)."""
    files = sorted(TRANSCRIPTS_DIR.glob("*_dialogues-*.jsonl"))
    if not files:
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    calls, _ = ingest(files, "dialogues")
    return split_calls(calls)["test"]


@pytest.fixture(scope="module")
def sets(test_calls: list[CallRecord]) -> dict[str, list[CallRecord]]:
    return make_eval_sets(test_calls, seed=0, limit=SIZE)


def _originals(calls: Sequence[CallRecord]) -> dict[str, CallRecord]:
    return {c.call_id: c for c in calls}


def _spread(counts: Counter[str]) -> int:
    return max(counts.values()) - min(counts.values())


# -------------------------------------------------------------------------------------------- the sets


def test_gold_is_balanced_stratified_and_unchanged(test_calls, sets) -> None:
    gold, by_id = sets["gold"], _originals(test_calls)
    fraud = [c for c in gold if c.labels.is_fraud]
    normal = [c for c in gold if not c.labels.is_fraud]
    assert len(fraud) == len(normal) == SIZE // 2
    assert [c.labels.is_fraud for c in gold[:4]] == [True, False, True, False]  # mixed from the first rows
    types = Counter(c.labels.fraud_type for c in fraud)
    scenes = Counter(c.labels.scene for c in normal)
    assert len(types) == 8 and _spread(types) <= 1 and len(scenes) == 7 and _spread(scenes) <= 1
    for call in gold:
        original = by_id[call.meta["original_id"]]
        assert call.call_id == f"{original.call_id}#gold"
        assert call.turns == original.turns and call.labels == original.labels


def test_disguised_opening_starts_with_a_real_service_call(test_calls, sets) -> None:
    by_id = _originals(test_calls)
    calls = sets["disguised_opening"]
    assert len(calls) == SIZE and _spread(Counter(c.labels.fraud_type for c in calls)) <= 1
    for call in calls:
        original, opener = by_id[call.meta["original_id"]], by_id[call.meta["opening_from"]]
        k = call.meta["opening_turns"]
        assert k in (1, 2) and not opener.labels.is_fraud and opener.labels.scene in SERVICE_SCENES
        assert [t.text for t in call.turns[:k]] == [t.text for t in opener.turns[:k]]
        assert [t.text for t in call.turns[k:]] == [t.text for t in original.turns]
        speakers = [t.speaker for t in call.turns]
        assert all(a != b for a, b in itertools.pairwise(speakers))  # still alternating
        assert call.labels == original.labels and call.labels.is_fraud
        assert call.audio is None and not call.timed  # re-timed when built; the old audio no longer fits


def test_fraud_words_in_normal_salts_caller_turns(test_calls, sets) -> None:
    by_id = _originals(test_calls)
    calls = sets["fraud_words_in_normal"]
    assert len(calls) == SIZE and _spread(Counter(c.labels.scene for c in calls)) <= 1
    for call in calls:
        original = by_id[call.meta["original_id"]]
        assert not call.labels.is_fraud and call.labels == original.labels
        words = call.meta["salted_words"]
        assert len(set(words)) == 2 and set(words) <= set(FRAUD_WORDS)
        caller = [t.text for t in call.turns if t.speaker == "left"]
        assert all("".join(caller).count(w) > original.transcript().count(w) for w in words)
        assert words[0] in caller[0]  # seen even in a prompt cut short
        # only the caller's turns changed, each by text added after the original
        for new, old in zip(call.turns, original.turns, strict=True):
            assert new.text.startswith(old.text) and (new.text == old.text or new.speaker == "left")


def test_code_switching_replaces_the_dictionary_words(test_calls, sets) -> None:
    by_id = _originals(test_calls)
    calls = sets["code_switching"]
    assert Counter(c.labels.is_fraud for c in calls) == {True: SIZE // 2, False: SIZE // 2}
    for call in calls:
        original, text = by_id[call.meta["original_id"]], call.transcript()
        assert call.labels == original.labels and call.meta["switched_words"]
        for word in call.meta["switched_words"]:
            assert word in original.transcript() and CODE_SWITCH[word] in text
        assert not any(word in text for word in CODE_SWITCH)
    assert code_switch_text("某某银行客服中心，验证码") == "某某bank customer service中心，verification code"


def test_very_short_keeps_the_first_two_turns_and_the_calls_label(test_calls, sets) -> None:
    by_id = _originals(test_calls)
    calls = sets["very_short"]
    assert Counter(c.labels.is_fraud for c in calls) == {True: SIZE // 2, False: SIZE // 2}
    for call in calls:
        original = by_id[call.meta["original_id"]]
        assert len(call.turns) <= 2 and call.turns == original.turns[: len(call.turns)]
        assert len(original.turns) >= 4 and call.meta["whole_turns"] == len(original.turns)
        assert call.labels == original.labels


@pytest.mark.parametrize("name", list(EVAL_SETS))
def test_sets_are_seeded_and_ids_unique(test_calls, name: str) -> None:
    make = EVAL_SETS[name]
    first = make(test_calls, 3, 12)
    assert 0 < len(first) <= 12 and len({c.call_id for c in first}) == len(first)
    assert all("#" in c.call_id for c in first)
    dump = [c.model_dump() for c in first]
    assert [c.model_dump() for c in make(list(reversed(test_calls)), 3, 12)] == dump  # order does not matter
    assert [c.model_dump() for c in make(test_calls, 4, 12)] != dump


def test_unknown_set_names_are_rejected() -> None:
    assert check_names(None) == list(EVAL_SETS) and check_names(["very_short", "gold"]) == [
        "gold",
        "very_short",
    ]
    with pytest.raises(ValueError, match="unknown evaluation set"):
        check_names(["gold", "short"])


# ------------------------------------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, test_calls: list[CallRecord]) -> Path:
    """A dataset folder from a small splits folder: 8 train calls, 80 test calls, sets of 8."""
    splits = tmp_path_factory.mktemp("splits")
    write_calls(splits / "train", test_calls[:8])
    write_calls(splits / "test", test_calls[8:88])
    out = tmp_path_factory.mktemp("datasets")
    build_datasets(splits, out, eval_set_size=8, max_transcript_chars=300)
    return out


def test_build_writes_every_set_like_the_test_split(built: Path) -> None:
    test_row = json.loads((built / "test" / "grpo.jsonl").read_text("utf-8").splitlines()[0])
    index = json.loads((built / EVAL_SETS_DIR / "card.json").read_text("utf-8"))
    assert list(index["built"]) == list(EVAL_SETS) and index["skipped"] == {}
    for name in EVAL_SETS:
        folder = built / EVAL_SETS_DIR / name
        rows = [json.loads(line) for line in (folder / "grpo.jsonl").read_text("utf-8").splitlines()]
        card = json.loads((folder / "card.json").read_text("utf-8"))
        assert card["eval_set"] == name and card["calls"] == index["built"][name] > 0
        assert card["rows"]["grpo_rows"] == len(rows) and (folder / "card.md").is_file()
        assert all(r["call_id"].endswith(f"#{TAGS[name]}") for r in rows)
        assert all(r["conversation_stage"] == "complete" and set(r) == set(test_row) for r in rows)
        assert rows[0]["messages"][0] == test_row["messages"][0]  # the same system prompt


def test_cli_builds_chosen_sets_and_rejects_unknown_ones(tmp_path: Path, test_calls) -> None:
    write_calls(tmp_path / "splits" / "test", test_calls[:40])
    out = tmp_path / "ds"
    (out / EVAL_SETS_DIR / "code_switching").mkdir(parents=True)  # left over from an earlier build
    runner = CliRunner()
    args = ["data", "build", str(tmp_path / "splits"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--eval-sets", "gold,very_short", "--eval-set-size", "6"])
    assert result.exit_code == 0, result.output
    assert "evaluation set gold: 6 calls" in result.output
    assert sorted(p.name for p in (out / EVAL_SETS_DIR).iterdir() if p.is_dir()) == ["gold", "very_short"]
    result = runner.invoke(app, [*args, "--eval-sets", "gold,shorter"])
    assert result.exit_code == 2 and "unknown evaluation set(s) shorter" in result.output


def test_audio_datasets_hold_only_the_sets_that_keep_their_audio(tmp_path: Path, test_calls) -> None:
    cuts: list[tuple[str, float | None, int]] = []

    def clips(call: CallRecord, end_s: float | None, cut: int) -> list[str]:
        cuts.append((call.call_id, end_s, cut))
        return [f"clips/{len(cuts)}.wav"]

    index = build_eval_sets(test_calls[:60], tmp_path, size=4, modality="audio", clip_maker=clips)
    assert set(index["built"]) == AUDIO_SETS and set(index["skipped"]) == set(EVAL_SETS) - AUDIO_SETS
    assert all("new audio" in why for why in index["skipped"].values())
    for call_id, end_s, turns in cuts:
        assert (end_s is None) == call_id.endswith("#gold") and (turns == 2 or call_id.endswith("#gold"))
    row = json.loads((tmp_path / "very_short" / "grpo.jsonl").read_text("utf-8").splitlines()[0])
    assert row["audios"] and "<audio>" in row["messages"][1]["content"]


# --------------------------------------------------------------------------------------------- evaluation


def _fraud(call_id: str, gold: str, label: bool | None) -> RoundPrediction:
    return RoundPrediction(call_id, "is_fraud", gold, format_answer("is_fraud", label, think="t"))


def test_report_shows_each_set_with_its_numbers(tmp_path: Path) -> None:
    main = [_fraud("m1", "fraud", True), _fraud("m2", "normal", True)]
    gold = [
        _fraud("a", "fraud", True),
        _fraud("b", "fraud", False),
        _fraud("c", "normal", False),
        _fraud("d", "normal", False),
    ]
    short = [RoundPrediction("e", "is_fraud", "fraud", "no idea"), _fraud("f", "normal", False)]
    results = {
        "base": {
            **evaluate_predictions(main),
            "eval_sets": {"gold": evaluate_predictions(gold), "very_short": evaluate_predictions(short)},
        },
        "grpo": {**evaluate_predictions(main), "eval_sets": {"gold": evaluate_predictions(gold[:2])}},
    }
    paths = write_report(results, tmp_path, plots=False)
    md = paths["markdown"].read_text("utf-8")
    section = md.split("## Results per evaluation set")[1].split("\n## ")[0]
    assert (
        "| set | base: fraud accuracy | base: fraud macro F1 | base: well-formed rate | base: n |" in section
    )
    # gold, base: 3 of 4 right; F1 fraud 2/3, normal 4/5 -> macro 0.733. grpo: 1 of 2; F1 2/3 and 0 -> 0.333
    assert "| held-out split | 0.500 | 0.333 | 1.000 | 2 | 0.500 | 0.333 | 1.000 | 2 |" in section
    assert "| gold | 0.750 | 0.733 | 1.000 | 4 | 0.500 | 0.333 | 1.000 | 2 |" in section
    # very_short, base: "unknown" is a class (F1 0), fraud F1 0, normal F1 1 -> 0.333; grpo has no such set
    assert "| very_short | 0.500 | 0.333 | 0.500 | 2 | n/a | n/a | n/a | n/a |" in section
    assert "Results per evaluation set" in paths["html"].read_text("utf-8")
    metrics = json.loads(paths["json"].read_text("utf-8"))
    assert metrics["base"]["eval_sets"]["gold"]["fraud"]["accuracy"] == 0.75
    assert metrics["base"]["fraud"]["accuracy"] == 0.5  # the main results keep their shape


def test_report_without_sets_has_no_set_section(tmp_path: Path) -> None:
    md = write_report({"base": evaluate_predictions([_fraud("a", "fraud", True)])}, tmp_path, plots=False)
    assert "evaluation set" not in md["markdown"].read_text("utf-8")


class AlwaysFraud:
    """The simplest detector: every call is fraud. Its score on a set is that set's share of fraud calls."""

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        return [[format_answer("is_fraud", True, think="t")] for _ in prompts]


def test_evaluate_models_scores_every_built_set(built: Path, tmp_path: Path) -> None:
    rows = read_eval_rows(built / "test", realtime=False, limit=None)
    sets = read_eval_sets(built, limit=None)
    assert list(sets) == list(EVAL_SETS)
    results = evaluate_models({"always": AlwaysFraud}, rows, tmp_path, max_tokens=8, eval_sets=sets)
    per_set = results["always"]["eval_sets"]
    assert per_set["disguised_opening"]["fraud"]["accuracy"] == 1.0  # fraud calls only
    assert per_set["fraud_words_in_normal"]["fraud"]["accuracy"] == 0.0  # normal calls only
    for name in ("gold", "code_switching", "very_short"):
        assert per_set[name]["fraud"]["accuracy"] == 0.5 and per_set[name]["fraud"]["n_samples"] == 8
    assert "accuracy" in results["always"]["fraud"]  # main results as before
    for name, set_rows in sets.items():
        lines = (tmp_path / f"predictions-always-{name}.jsonl").read_text("utf-8").splitlines()
        assert len(lines) == len(set_rows)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert "| gold | 0.500 |" in md and "| disguised_opening | 1.000 |" in md
    assert len(read_eval_sets(built, limit=3)["gold"]) == 3
