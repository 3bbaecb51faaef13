"""Per-call reasoning (teleguard.data.evidence) and the real-time warm-start rows built from it."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from teleguard.contract import PromptFileError, Round, Stage, load_prompts, parse_output
from teleguard.data.dataset import build_split
from teleguard.data.evidence import RationaleWriter, find_evidence, quotes_in, reasoning_figures
from teleguard.data.ingest import ingest
from teleguard.data.records import CallLabels, CallRecord, Turn
from teleguard.data.rounds import RowBuilder, round_truths, sample_of_call
from teleguard.data.timing import estimate_times
from teleguard.engines.contract import EngineRequest
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import Chunk, Segment
from teleguard.serve.session import CallSession
from tests.support.paths import REPO, TRANSCRIPTS_DIR

CPU_PROMPTS = REPO / "recipes" / "safe-qaq" / "prompts-cpu-zh.yaml"
WINDOW = 160  # the CPU recipe's transcript window


@pytest.fixture(scope="module")
def shared_calls() -> list[CallRecord]:
    files = sorted(TRANSCRIPTS_DIR.glob("*_dialogues-*.jsonl"))
    if not files:
        pytest.skip("the shared TeleAntiFraud transcripts are not beside this checkout (../shared/data)")
    calls, _ = ingest(files, "dialogues")
    return [estimate_times(c) for c in calls]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, shared_calls: list[CallRecord]) -> Path:
    """A split of about 350 shared calls, with the near-identical takeaway openings that would share a
    rationale if nothing told them apart, and two real-time prefixes per call."""
    alike = [c for c in shared_calls if c.turns[0].text.startswith("欢迎使用我们的外卖服务")]
    assert len(alike) >= 20  # the hard case is in the data
    calls = alike + [c for c in shared_calls[::25] if c not in alike]
    out = tmp_path_factory.mktemp("evidence") / "train"
    build_split(calls, out, prompts=str(CPU_PROMPTS), max_transcript_chars=WINDOW, realtime_sft=2)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def call_of(*texts: str, labels: CallLabels | None = None) -> CallRecord:
    turns = tuple(Turn(speaker="left" if i % 2 == 0 else "right", text=t) for i, t in enumerate(texts))
    labels = labels or CallLabels(is_fraud=True, fraud_type="银行诈骗")
    return estimate_times(CallRecord(call_id="c", source="test", turns=turns, labels=labels))


# ------------------------------------------------------------------------------------------------ evidence


def test_evidence_is_a_substring_of_its_call_on_every_shared_call(shared_calls: list[CallRecord]) -> None:
    writer = RationaleWriter(load_prompts(CPU_PROMPTS))
    quoted = in_window = 0
    lengths = []
    for call in shared_calls:
        transcript = call.transcript()
        for truth in round_truths(call.labels):
            r = writer.write(call, truth.round, truth.label, key=call.call_id, visible_chars=WINDOW)
            assert r.quotes and all(q in transcript for q in r.quotes), (call.call_id, r.think)
            assert quotes_in(r.think) == list(r.quotes)  # the quotes read back from the text are these
            quoted += len(r.quotes)
            in_window += sum(q in transcript[:WINDOW] for q in r.quotes)
            lengths.append(len(r.think))
    assert (
        in_window / quoted >= 0.99
    )  # quotes come from what the prompt shows (beyond it only to tell calls apart)
    assert max(lengths) <= 130 and 55 <= statistics.fmean(lengths) <= 100
    assert writer.shared == 0


def test_salience_picks_the_decisive_clause() -> None:
    call = call_of(
        "您好，我是张经理。为了您的账户安全，请您提供一下短信验证码，否则账户会被冻结。",
        "验证码是多少位的？",
        "六位的，您的包裹在海关被扣留了，需要支付手续费才能放行，请尽快处理这件事情以免产生更多的滞纳金和额外费用。",
    )
    fraud = find_evidence(call, Round.FRAUD, True)
    assert fraud is not None and fraud.salient
    assert fraud.hits[0].quote == "请您提供一下短信验证码"
    assert [(c.cue, c.strong) for c in fraud.hits[0].cues] == [("code", True)]  # asked for, not mentioned
    # the type round looks for the type's words: a parcel held at customs, for 邮件诈骗
    kind = find_evidence(call, Round.FRAUD_TYPE, "邮件诈骗")
    assert kind is not None and "包裹" in kind.hits[0].quote and kind.salient
    # a long clause is quoted as a window of at most 40 characters around its cue, still a substring
    long = find_evidence(
        call_of("为了保障您的资金安全以及后续的一系列服务能够顺利进行我们需要您立即下载我们的官方软件"),
        "is_fraud",
        True,
    )
    assert long is not None
    quote = long.hits[0].quote
    assert len(quote) <= 40 and "下载" in quote and quote in call_of(quote).transcript()
    # a greeting alone is no evidence
    greeting = find_evidence(call_of("喂，您好，请问是李先生吗？", "是我，哪位？"), Round.FRAUD, True)
    assert greeting is not None and not greeting.salient


def test_rationale_names_the_pattern_and_ends_with_the_decision() -> None:
    prompts = load_prompts("zh")
    call = call_of(
        "您好，这里是建设银行客服中心，我们发现您的账户有异常交易。", "怎么回事？", "请您提供银行卡号和密码。"
    )
    builder = RowBuilder(prompts, "offline", "text")
    [row] = builder.sft_rows(sample_of_call(call))
    is_fraud, kind = (parse_output(m["content"]) for m in row["messages"] if m["role"] == "assistant")
    assert is_fraud.think is not None and is_fraud.think.endswith("判断为诈骗。")
    assert "请您提供银行卡号和密码" in is_fraud.think and "索要" in is_fraud.think
    assert kind.think is not None and prompts.rationales.patterns["银行诈骗"] in kind.think
    assert kind.think.endswith("属于银行诈骗。") and kind.reason == prompts.rationales.patterns["银行诈骗"]


# ----------------------------------------------------------------------------------------- a built split


def test_no_two_calls_share_a_rationale_in_a_built_split(built: Path) -> None:
    """Whole calls: every call's reasoning is its own. Real-time prefixes: the 1-turn prefixes of calls that
    open with the very same words (20+ takeaway calls here) show the model nearly the same prompt, and a few
    of them share a target; the card counts them."""
    card = json.loads((built / "card.json").read_text("utf-8"))
    targets, offline = [], []
    for row in read_rows(built / "sft.jsonl"):
        for m in row["messages"]:
            if m["role"] == "assistant":
                think = parse_output(m["content"]).think
                assert think
                targets.append(m["content"])
                if row["mode"] == "offline":
                    offline.append(think)
    assert len(set(offline)) == len(offline)  # whole calls: no two targets at all, so no two calls
    # reference answers in GRPO prompts are the SFT targets of the same call and round
    for row in read_rows(built / "grpo.jsonl"):
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert m["content"] in targets
    thinks = [parse_output(t).think for t in targets]
    assert len(set(thinks)) >= 0.99 * len(thinks)
    assert card["reasoning"]["distinct_thinks"] == len(set(thinks)) and card["reasoning"]["answers"] == len(
        thinks
    )


def test_card_figures_are_the_rows_figures(built: Path) -> None:
    card = json.loads((built / "card.json").read_text("utf-8"))
    figures = card["reasoning"]
    targets = [
        parse_output(m["content"]).think or ""
        for row in read_rows(built / "sft.jsonl")
        for m in row["messages"]
        if m["role"] == "assistant"
    ]
    assert figures["distinct_reasoning_rate"] == round(len(set(targets)) / len(targets), 4)
    assert figures["distinct_reasoning_rate"] >= 0.99 and figures["evidence_in_transcript_rate"] == 1.0
    assert figures["evidence_in_prompt_rate"] >= 0.99
    assert figures["mean_think_chars"] == round(statistics.fmean(map(len, targets)), 1)
    assert figures["quotes"] == sum(len(quotes_in(t)) for t in targets)
    assert "distinct_reasoning_rate" in (built / "card.md").read_text("utf-8")
    assert card["realtime_sft"] == 2 and card["rows"]["sft_realtime_rows"] > 0


def test_early_null_targets_read_back_as_insufficient(built: Path) -> None:
    prompts = load_prompts(CPU_PROMPTS)
    card = json.loads((built / "card.json").read_text("utf-8"))
    nulls = 0
    for row in read_rows(built / "sft.jsonl"):
        assistants = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        for i in assistants:
            parsed = parse_output(row["messages"][i]["content"])
            assert parsed.well_formed and parsed.conversation_stage == row["conversation_stage"]
            if parsed.label is None:
                nulls += 1
                assert row["mode"] == "realtime" and row["conversation_stage"] == Stage.EARLY
                assert parsed.insufficient and parsed.reason == prompts.insufficient
                if parsed.round is Round.FRAUD:
                    assert i == assistants[-1]  # no fraud-type round after a null is_fraud
            else:
                assert not parsed.insufficient
    assert nulls == card["sft_realtime_null_targets"] > 0


def _prefix_of(call: CallRecord, turns: int) -> CallSession:
    """A live session fed the call's first `turns` turns, one finished turn per chunk, as a client sends them."""
    session = CallSession(call.call_id)
    for seq, t in enumerate(call.turns[:turns]):
        segment = Segment(speaker=t.speaker, text=t.text, start=t.start or 0.0, end=t.end or 0.0)
        session.receive(Chunk(call_id=call.call_id, seq=seq, segments=[segment]))
    return session


def _scripted(targets: dict[Round | None, str], sent: list[EngineRequest]) -> Any:
    """An engine that records the requests and answers each round with its target (no target: a null)."""

    async def generate(requests: Sequence[EngineRequest]) -> list[str]:
        sent.extend(requests)
        null = '<think>x</think><answer>{"scene": null}</answer>'
        return [targets.get(r.round, null) for r in requests]

    return generate


def test_realtime_sft_rows_are_the_prompts_the_detector_sends(
    built: Path, shared_calls: list[CallRecord]
) -> None:
    by_id = {c.call_id: c for c in shared_calls}
    policy = DecisionPolicy(prompts_file=str(CPU_PROMPTS), max_transcript_chars=WINDOW, every_seconds=None)
    prefixes: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in read_rows(built / "sft.jsonl"):
        if row["mode"] == "realtime":
            prefixes[(row["call_id"], row["audio_idx"])].append(row)
    compared = follow_ups = 0
    for (call_id, turns), rows in list(prefixes.items())[::10]:
        # the model answers exactly the targets: then every prompt it gets must be the row's
        targets = {
            parse_output(m["content"]).round: m["content"]
            for row in rows
            for m in row["messages"]
            if m["role"] == "assistant"
        }
        sent: list[EngineRequest] = []
        generate = _scripted(targets, sent)

        asyncio.run(policy.evaluate(_prefix_of(by_id[call_id], turns), generate))
        asked = {r.round: r.messages for r in sent}
        for row in rows:
            messages = row["messages"]
            for i, m in enumerate(messages):
                if m["role"] == "user":
                    round_ = parse_output(messages[i + 1]["content"]).round
                    assert asked[round_] == messages[: i + 1], (call_id, turns, round_)
                    compared += 1
                    follow_ups += round_ is Round.FRAUD_TYPE
    assert compared >= 30 and follow_ups >= 5  # first rounds and fraud-type follow-ups both checked


# ---------------------------------------------------------------------------------------------- figures


def test_reasoning_figures_of_model_outputs() -> None:
    call = "左：请提供验证码\n右：好的"
    answer = '<answer>{"is_fraud": true}</answer>'
    outputs = [
        (call, f"<think>来电方说“请提供验证码”，是诈骗。</think>{answer}"),
        (call, f"<think>来电方说“请提供验证码”，是诈骗。</think>{answer}"),  # the same reasoning again
        (call, f"<think>来电方说“请转账”，又说“请提供验证码”</think>{answer}"),  # one quote not in the call
        (call, answer),  # no reasoning
        (call, f"<think>没有引用</think>{answer}"),
    ]
    figures = reasoning_figures(outputs)
    assert figures["answers"] == 5 and figures["with_think"] == 4 and figures["distinct_thinks"] == 3
    assert figures["distinct_reasoning_rate"] == 0.6 and figures["quoting_rate"] == 0.6
    assert figures["quotes"] == 4 and figures["evidence_in_transcript_rate"] == 0.75
    assert figures["answers_with_all_quotes_found"] == 2
    windowed = reasoning_figures(outputs, windows=["左：请"] * 5)
    assert windowed["evidence_in_prompt_rate"] == 0.0
    assert reasoning_figures([])["distinct_reasoning_rate"] == 0.0


# ------------------------------------------------------------------------------------------- prompt files


def test_rationale_wording_comes_from_the_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "rationales:\n  fraud_type: $quote；$pattern；定为$label\n  patterns:\n    银行诈骗: 自定义的银行套路\n",
        "utf-8",
    )
    call = call_of("您好，这里是银行，您的账户异常，请提供验证码。")
    [row] = RowBuilder(load_prompts(path), "offline", "text").sft_rows(sample_of_call(call))
    think = parse_output(row["messages"][-1]["content"]).think
    assert think is not None and think.endswith("；自定义的银行套路；定为银行诈骗")


@pytest.mark.parametrize(
    ("content", "field", "message"),
    [
        ("rationales:\n  fraud: 判断为诈骗。\n", "rationales.fraud", "$quote"),
        ("rationales:\n  scene: $quote，场景清楚。\n", "rationales.scene", "$label"),
        ("rationales:\n  patterns:\n    银河诈骗: x\n", "rationales.patterns", "unknown: 银河诈骗"),
        ("rationales:\n  patterns:\n    银行诈骗: 称“账户异常”\n", "rationales.patterns", "quotation mark"),
        ("rationales:\n  reasons:\n    fraud: 他说“x”\n", "rationales", "reasons.fraud"),
        ("rationales:\n  turn: 第几句\n", "rationales.turn", "$turn"),
        ("rationales:\n  cues:\n    bribe: x\n", "rationales.cues.bribe", "xtra"),
    ],
)
def test_bad_rationale_templates_name_file_and_field(
    tmp_path: Path, content: str, field: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, "utf-8")
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    assert str(path) in str(err.value) and f"field '{field}'" in str(err.value) and message in str(err.value)


def test_cli_realtime_sft_knob(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from teleguard.cli import app
    from teleguard.data.dataset import write_calls

    calls = [
        call_of(
            "您好，这里是银行，您的账户异常。",
            "什么异常？",
            "请您提供验证码。",
            "好的。",
            "请马上转账。",
            "不行。",
        ).model_copy(update={"call_id": f"c{i}"})
        for i in range(3)
    ]
    write_calls(tmp_path / "splits" / "train", calls)
    runner = CliRunner()
    for n, realtime_rows in (("0", 0), ("2", 6)):
        out = tmp_path / f"ds{n}"
        args = ["data", "build", str(tmp_path / "splits"), "--out", str(out), "--eval-sets", "none"]
        result = runner.invoke(app, [*args, "--realtime-sft", n])
        assert result.exit_code == 0, result.output
        rows = read_rows(out / "train" / "sft.jsonl")
        assert (
            sum(r["mode"] == "realtime" for r in rows) == realtime_rows
        )  # early and late prefix of each call
        assert sum(r["mode"] == "offline" for r in rows) == 3
        assert json.loads((out / "train" / "card.json").read_text("utf-8"))["realtime_sft"] == int(n)
