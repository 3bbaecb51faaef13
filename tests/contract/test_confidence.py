"""The detector's confidence: the model's own probability of the label it wrote (teleguard.contract.confidence).

- On a tiny Qwen3 taught fixed answers to the detector's own prompts, the confidence of each decision (read by
  ms-swift's transformers engine from the answer tokens' logprobs) equals the probability recomputed from the
  model's logits in a plain transformers forward pass over prompt + generated answer, with the label tokens
  found independently (the shortest token window whose decoding holds the label's JSON literal). The offline
  engine's `Completion.confidence` gives the same number. Its tokenizer is byte-level without merges, so a
  Chinese label's characters are split across tokens (the U+FFFD case) and ms-swift prefixes an empty think
  block the tokens lack.
- With a scripted engine whose token logprobs are known, the alert fires exactly when the confidence reaches
  the threshold (whatever the answer states), and the cascade escalates on it.
- The remote engine asks an OpenAI-compatible stand-in on loopback for logprobs and reads them, bytes of split
  characters included; a stand-in that sends none leaves the stated confidence, marked as such.
- Answers without a label span get no confidence, with a problem saying why.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from teleguard.contract import Round, builtin_prompts, format_answer
from teleguard.contract.confidence import (
    TokenLogprob,
    label_probability,
    label_span,
    read_confidence,
    token_logprobs,
)
from teleguard.engines import Prompt, SamplingParams
from teleguard.engines.cascade import CascadeEngine, escalation_reason
from teleguard.engines.contract import EngineConfig, EngineRequest, Generation
from teleguard.engines.remote import RemoteEngine
from teleguard.engines.swift import SwiftServingEngine
from teleguard.serve.detector import Detector
from teleguard.serve.metrics import DetectorMetrics
from teleguard.serve.policy import DecisionPolicy
from teleguard.serve.protocol import Decision
from teleguard.tiny_models import build_tiny_model
from tests.support.loopback_api import LoopbackApi
from tests.support.tiny_training import teach_answers

FRAUD_TYPE = "投资诈骗"
SCENE = "咨询客服"
POLICY = DecisionPolicy(every_seconds=None, min_turns=1, ask_scene="never", max_tokens=160)
TURN = [
    {
        "speaker": "left",
        "text": "我是投资顾问，带你炒币稳赚不赔，先转五万到这个账户。",
        "start": 0.0,
        "end": 3.0,
    }
]
TYPE_QUESTION = builtin_prompts("zh").user_prompt(Round.FRAUD_TYPE, "realtime", with_call=False)


def answer(round_: Round, label: Any, stated: float = 1.0) -> str:
    return format_answer(round_, label, stage="late_stage", reason="r", confidence=stated, think="t")


def literal(label: Any) -> str:
    """The label's JSON literal as `format_answer` writes it."""
    return json.dumps(label, ensure_ascii=False)


def split_tokens(
    text: str, value: str, pieces: Sequence[TokenLogprob], other: float = -0.05
) -> list[TokenLogprob]:
    """`text` as tokens: 4-character tokens up to the value literal (its first occurrence in the answer
    block), the literal as `pieces`, then 4-character tokens; every token outside the literal logprob `other`."""
    start = text.index(value, text.index("<answer>"))
    assert "".join(p for p, _ in pieces) == value
    before, after = text[:start], text[start + len(value) :]
    chunk = [(before[i : i + 4], other) for i in range(0, len(before), 4)]
    rest = [(after[i : i + 4], other) for i in range(0, len(after), 4)]
    return [*chunk, *pieces, *rest]


# ------------------------------------------------------------------------------------ the definition, units


def test_label_span_is_the_json_literal_quotes_included() -> None:
    text = answer(Round.FRAUD_TYPE, FRAUD_TYPE)
    start, end = label_span(text, Round.FRAUD_TYPE)  # type: ignore[misc]
    assert text[start:end] == f'"{FRAUD_TYPE}"'
    fraud = answer(Round.FRAUD, True)
    start, end = label_span(fraud, Round.FRAUD)  # type: ignore[misc]
    assert fraud[start:end] == "true"
    null = answer(Round.SCENE, None)
    start, end = label_span(null, Round.SCENE)  # type: ignore[misc]
    assert null[start:end] == "null"
    # a raw newline inside a string (the parser's lenient reading) does not move the span
    raw = '<answer>{"reason": "a\nb", "is_fraud": false, "confidence": 1}</answer>'
    start, end = label_span(raw, Round.FRAUD)  # type: ignore[misc]
    assert raw[start:end] == "false"
    # the key's last top-level occurrence, as json.loads keeps it; a key inside a string does not count
    tricky = '<answer>{"reason": "\\"is_fraud\\": true", "is_fraud": null, "is_fraud": false}</answer>'
    start, end = label_span(tricky, Round.FRAUD)  # type: ignore[misc]
    assert (start, tricky[start:end]) == (tricky.rindex("false"), "false")


def test_probability_is_exp_of_the_label_tokens_logprobs() -> None:
    text = answer(Round.FRAUD, True)
    tokens = split_tokens(text, "true", [("tr", math.log(0.8)), ("ue", math.log(0.5))])
    found = label_probability(text, tokens, Round.FRAUD)
    assert found.problem is None and found.probability == pytest.approx(0.4, abs=1e-12)
    assert [tokens[i][0] for i in found.tokens] == ["tr", "ue"]
    # a token that also carries neighbouring characters counts whole
    merged = split_tokens(text, '"is_fraud": true,', [('"is_fraud": true,', math.log(0.3))])
    assert label_probability(text, merged, Round.FRAUD).probability == pytest.approx(0.3)
    # a certain label is probability 1, never above it
    assert label_probability(text, split_tokens(text, "true", [("true", 1e-9)])).probability == 1.0


def test_split_characters_a_response_prefix_and_stop_tokens() -> None:
    """ms-swift's non-thinking prefix is in the text but not in the tokens, <|im_end|> the other way round,
    and a character split across tokens decodes to U+FFFD in each of them."""
    body = answer(Round.FRAUD_TYPE, FRAUD_TYPE)
    text = "<think>\n\n</think>\n\n" + body
    pieces = [(' "', -0.1), ("\ufffd", -0.2), ("\ufffd资", -0.3), ("诈骗", -0.4), ('",', -0.5)]
    start = body.index(' "投资')
    tokens = [
        (body[:start], -0.01),
        *pieces,
        (body[start + len(' "投资诈骗",') :], -0.01),
        ("<|im_end|>", -0.02),
    ]
    found = label_probability(text, tokens, Round.FRAUD_TYPE)
    assert found.problem is None and found.tokens == (1, 2, 3, 4, 5)
    assert found.probability == pytest.approx(math.exp(-1.5))


@pytest.mark.parametrize(
    ("text", "tokens", "problem"),
    [
        ("<think>t</think>fraud", [("<think>t</think>fraud", -0.1)], "no answer JSON object"),
        (
            '<answer>{"conversation_stage": "late_stage", "confidence": 1}</answer>',
            [('<answer>{"conversation_stage": "late_stage", "confidence": 1}</answer>', -0.1)],
            "has no is_fraud value",
        ),
        # the engine's tokens spell another answer than its text
        (answer(Round.FRAUD, True), [(answer(Round.FRAUD, False), -0.1)], "do not spell"),
        (answer(Round.FRAUD, True), [], "no generated tokens"),
    ],
)
def test_no_label_span_gives_none_with_a_problem(text: str, tokens: list[TokenLogprob], problem: str) -> None:
    found = label_probability(text, tokens, Round.FRAUD)
    assert found.probability is None and found.problem and problem in found.problem


def test_stated_confidence_only_without_logprobs() -> None:
    text = answer(Round.FRAUD, True, stated=0.9)
    stated = read_confidence(text, Round.FRAUD, None)
    assert (stated.value, stated.stated, stated.source) == (0.9, 0.9, "stated")
    tokens = split_tokens(text, "true", [("true", math.log(0.25))])
    measured = read_confidence(text, Round.FRAUD, tokens)
    assert measured.value == pytest.approx(0.25) and (measured.stated, measured.source) == (0.9, "tokens")


def test_token_logprobs_of_a_chat_choice() -> None:
    content = [
        {"token": ' "', "logprob": -0.1, "bytes": [32, 34]},
        {"token": "bytes:\\xe6\\x8a", "logprob": -0.2, "bytes": [0xE6, 0x8A]},  # OpenAI's split character
        {"token": "投", "logprob": -0.3},
    ]
    assert token_logprobs({"content": content}) == ((' "', -0.1), ("\ufffd", -0.2), ("投", -0.3))
    assert token_logprobs(None) is None and token_logprobs({"content": None}) is None
    assert token_logprobs({"content": [{"token": "x", "logprob": "high"}]}) is None


# --------------------------------------------------------------------- the alert threshold, scripted engine


@dataclass
class Scripted:
    """Answers is_fraud with `fraud` and fraud_type with `kind` (Generations carrying token logprobs)."""

    fraud: Generation
    kind: Generation | None = None

    async def __call__(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        return [self.fraud if r.round is Round.FRAUD else (self.kind or self.fraud) for r in requests]


def fraud_generation(probability_pieces: Sequence[float], stated: float = 1.0) -> Generation:
    text = answer(Round.FRAUD, True, stated)
    parts = ["t", "r", "u", "e"][: len(probability_pieces) - 1]
    parts.append("true"[len(parts) :])
    pieces = [(p, math.log(q)) for p, q in zip(parts, probability_pieces, strict=True)]
    return Generation(text, 20, tuple(split_tokens(text, "true", pieces)))


async def decisions_of(engine: Any, policy: DecisionPolicy) -> list[Decision]:
    """The decisions a detector with `engine` makes on a call's first turn (then it closes the engine)."""
    detector = Detector(engine, policy=policy, metrics=DetectorMetrics(CollectorRegistry()))
    await detector.open({"call_id": "c1"})
    result = await detector.chunk({"call_id": "c1", "seq": 0, "segments": TURN})
    await detector.aclose()
    return result.decisions


def decide(engine: Any, policy: DecisionPolicy) -> list[Decision]:
    return asyncio.run(decisions_of(engine, policy))


def test_the_alert_fires_exactly_when_the_token_probability_reaches_the_threshold() -> None:
    generation = fraud_generation([0.9, 0.7])  # stated 1.0: it must not matter
    p = math.exp(math.log(0.9) + math.log(0.7))  # the label tokens' probability, as the definition says
    kind = Generation(answer(Round.FRAUD_TYPE, FRAUD_TYPE), 9, None)
    engine = Scripted(generation, kind)
    below = decide(engine, POLICY.model_copy(update={"alert_threshold": math.nextafter(p, 1.0)}))
    at = decide(engine, POLICY.model_copy(update={"alert_threshold": p}))
    above = decide(engine, POLICY.model_copy(update={"alert_threshold": p - 1e-6}))
    [no_alert] = below
    assert no_alert.is_fraud is True and not no_alert.alert and no_alert.confidence == p
    assert (no_alert.stated_confidence, no_alert.confidence_source) == (1.0, "tokens")
    for decisions in (at, above):
        assert [d.round for d in decisions] == [Round.FRAUD, Round.FRAUD_TYPE]  # alert, then round 3
        assert decisions[0].alert and decisions[0].confidence == p
    # round 3's engine sent no logprobs: its confidence is the stated one, and says so
    assert (at[1].confidence, at[1].confidence_source) == (1.0, "stated")
    # a stated 1.0 with a low token probability raises no alert at the default threshold
    [low] = decide(Scripted(fraud_generation([0.3])), POLICY)
    assert low.confidence == pytest.approx(0.3) and not low.alert and POLICY.alert_threshold == 0.5


def test_an_answer_without_a_label_span_has_no_confidence_and_no_alert() -> None:
    text = '<think>t</think><answer>{"conversation_stage": "late_stage", "is_fraud": true, "confidence": 1}'
    generation = Generation(text, 12, ((text, -0.01),))  # truncated: no </answer>, so no answer JSON
    [d] = decide(Scripted(generation), POLICY.model_copy(update={"alert_threshold": 0.01}))
    assert d.confidence is None and not d.alert and d.confidence_source == "tokens"
    assert any(p.startswith("confidence: no label span") for p in d.problems)
    spelled_otherwise = Generation(answer(Round.FRAUD, True), 12, ((answer(Round.FRAUD, False), -0.01),))
    [d] = decide(Scripted(spelled_otherwise), POLICY.model_copy(update={"alert_threshold": 0.01}))
    assert d.is_fraud is True and d.confidence is None and not d.alert
    assert any("do not spell" in p for p in d.problems)


def test_the_cascade_escalates_on_the_token_probability() -> None:
    sure, unsure = fraud_generation([0.95], stated=0.1), fraud_generation([0.4], stated=1.0)
    assert escalation_reason(sure.text, Round.FRAUD, 0.7, logprobs=sure.logprobs) is None
    assert escalation_reason(unsure.text, Round.FRAUD, 0.7, logprobs=unsure.logprobs) == "low_confidence"
    no_span = Generation(unsure.text, 5, ((answer(Round.FRAUD, False), -0.1),))
    assert escalation_reason(no_span.text, Round.FRAUD, 0.7, logprobs=no_span.logprobs) == "no_confidence"
    large_text = answer(Round.FRAUD, False)
    large = Generation(large_text, 7, tuple(split_tokens(large_text, "false", [("false", math.log(0.99))])))
    answers = {"sure": sure, "unsure": unsure, "no-span": no_span}

    async def small(requests: Sequence[EngineRequest]) -> list[Generation]:
        return [answers[r.call_id] for r in requests]

    async def big(requests: Sequence[EngineRequest]) -> list[Generation]:
        return [large for _ in requests]

    cascade = CascadeEngine(small, big, threshold=0.7, metrics=DetectorMetrics(CollectorRegistry()))
    requests = [EngineRequest(c, Round.FRAUD, [{"role": "user", "content": c}]) for c in answers]
    got = asyncio.run(cascade.generate(requests))
    assert [(g.answered_by, g.escalation) for g in got] == [
        ("small", None),
        ("large", "low_confidence"),
        ("large", "no_confidence"),
    ]
    assert [g.small_confidence for g in got] == [pytest.approx(0.95), pytest.approx(0.4), None]
    # the answer used carries its own engine's logprobs, so the policy reads the large model's confidence
    assert got[0].logprobs == sure.logprobs and got[1].logprobs == large.logprobs


# -------------------------------------------------------------------------- the remote engine, on loopback


class ChatStandIn(LoopbackApi):
    """An OpenAI-compatible /v1/chat/completions: is_fraud and round-3 answers with scripted logprobs."""

    def __init__(self, *, logprobs: bool = True) -> None:
        super().__init__()
        self.logprobs = logprobs
        self.bodies: list[dict[str, Any]] = []

    @staticmethod
    def fraud() -> tuple[str, list[dict[str, Any]]]:
        text = answer(Round.FRAUD, True)
        tokens = split_tokens(text, "true", [("tr", math.log(0.9)), ("ue", math.log(0.8))])
        return text, [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tokens]

    @staticmethod
    def fraud_type() -> tuple[str, list[dict[str, Any]]]:
        text = answer(Round.FRAUD_TYPE, FRAUD_TYPE)
        start = text.index('"投资')
        head, tail = text[:start], text[start + len('"投资诈骗"') :]
        first = "投".encode()
        content = [
            {"token": head, "logprob": -0.01, "bytes": list(head.encode())},
            {"token": '"', "logprob": math.log(0.9), "bytes": [34]},
            # 投 split across two tokens, written as OpenAI writes such tokens
            {"token": "bytes:\\xe6\\x8a", "logprob": math.log(0.5), "bytes": list(first[:2])},
            {"token": "\\x95资", "logprob": math.log(0.8), "bytes": list(first[2:] + "资".encode())},
            {"token": "诈骗", "logprob": math.log(0.95), "bytes": list("诈骗".encode())},
            {"token": '"', "logprob": math.log(0.99), "bytes": [34]},
            {"token": tail, "logprob": -0.01, "bytes": list(tail.encode())},
        ]
        return text, content

    def route(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any]:
        if (method, path) != ("POST", "/v1/chat/completions"):
            raise KeyError(path)
        request = json.loads(body)
        self.bodies.append(request)
        last = request["messages"][-1]["content"]
        text, content = self.fraud_type() if last == TYPE_QUESTION else self.fraud()
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        if self.logprobs and request.get("logprobs"):
            choice["logprobs"] = {"content": content}
        return 200, {"choices": [choice], "usage": {"completion_tokens": len(content)}}


def remote_decisions(stand_in: ChatStandIn) -> list[Decision]:
    stand_in.start()
    try:
        config = EngineConfig(kind="remote", url=f"{stand_in.url}/v1", model="m", timeout_s=10)
        return decide(RemoteEngine(config), POLICY)
    finally:
        stand_in.stop()


def test_the_remote_engine_reads_the_endpoints_logprobs() -> None:
    stand_in = ChatStandIn()
    fraud, kind = remote_decisions(stand_in)
    assert all(body["logprobs"] is True for body in stand_in.bodies) and len(stand_in.bodies) == 2
    assert fraud.alert and fraud.confidence == pytest.approx(0.72) and fraud.confidence_source == "tokens"
    assert kind.round is Round.FRAUD_TYPE and kind.fraud_type == FRAUD_TYPE
    assert kind.confidence == pytest.approx(0.9 * 0.5 * 0.8 * 0.95 * 0.99) and kind.stated_confidence == 1.0
    assert not [p for p in kind.problems if p.startswith("confidence")]


def test_an_endpoint_without_logprobs_leaves_the_stated_confidence() -> None:
    [fraud, _] = remote_decisions(ChatStandIn(logprobs=False))
    assert (fraud.confidence, fraud.stated_confidence, fraud.confidence_source) == (1.0, 1.0, "stated")


# ---------------------------------------------------------------- a tiny model: the engine against its logits


# scene and is_fraud in one batched engine call; no round 3 (its prompt would be a second turn, which the
# test helper renders as Qwen3's chat template does, not as ms-swift does); threshold 1: no alert
TINY_POLICY = POLICY.model_copy(update={"ask_scene": "until_known", "alert_threshold": 1.0})
LABELS = {Round.FRAUD: True, Round.SCENE: SCENE}


@dataclass(frozen=True)
class Taught:
    path: Path
    answers: dict[Round, str]


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Taught:
    """A tiny Qwen3 (byte-level tokenizer: Chinese characters span several tokens) taught the detector's
    is_fraud prompt -> fraud, and its scene prompt -> SCENE."""
    answers = {r: answer(r, label) for r, label in LABELS.items()}
    seen: list[EngineRequest] = []

    async def record(requests: Sequence[EngineRequest]) -> list[str]:
        seen.extend(requests)
        return [answer(r.round, LABELS.get(r.round), stated=0.5) for r in requests]

    decide(record, TINY_POLICY)
    assert [r.round for r in seen] == [Round.FRAUD, Round.SCENE]
    prompts = {r.round: r.messages for r in seen}
    path = build_tiny_model(
        tmp_path_factory.mktemp("confidence") / "model", "qwen3", hidden_size=64, seed=0
    ).path
    teach_answers(path, [(prompts[r], answers[r]) for r in answers])
    return Taught(path, answers)


def recomputed(
    model: Any, tokenizer: Any, prompt_ids: list[int], ids: list[int], value: str
) -> tuple[float, range]:
    """The label's probability from a forward pass, and the label tokens: the shortest window of generated
    tokens whose decoding holds the value literal."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    chosen = logprobs.gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    end = next(j for j in range(1, len(ids) + 1) if value in tokenizer.decode(ids[:j]))
    start = max(i for i in range(end) if value in tokenizer.decode(ids[i:end]))
    return math.exp(float(chosen[start:end].sum())), range(start, end)


def test_confidence_equals_the_probability_from_the_models_logits(taught: Taught) -> None:
    import torch
    from swift.infer_engine import InferRequest, RequestConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served: list[tuple[EngineRequest, Generation]] = []
    engine = SwiftServingEngine(EngineConfig(kind="transformers", model=str(taught.path), device="cpu"))

    async def recording(requests: Sequence[EngineRequest]) -> list[Generation]:
        answers = await engine.generate(requests)
        served.extend(zip(requests, answers, strict=True))
        return answers

    async def main() -> list[Decision]:
        try:
            return await decisions_of(recording, TINY_POLICY)
        finally:
            await engine.aclose()

    decisions = asyncio.run(main())
    assert [d.round for d in decisions] == [Round.SCENE, Round.FRAUD]  # the scene decision comes first
    decisions.reverse()  # in the order of the requests
    model = AutoModelForCausalLM.from_pretrained(taught.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(taught.path)
    for decision, (request, generation) in zip(decisions, served, strict=True):
        assert generation.text.endswith(taught.answers[request.round])  # the model learned its answer
        assert generation.text != taught.answers[request.round]  # ms-swift's prefix: text the tokens lack
        # the same request again, with the prompt's and the answer's token ids
        [response] = engine.swift.infer(
            [InferRequest(messages=request.messages)],
            RequestConfig(max_tokens=request.max_tokens, temperature=0.0, return_details=True),
            use_tqdm=False,
        )
        assert response.choices[0].message.content == generation.text
        ids = response.choices[0].token_ids
        value = literal(LABELS[request.round])
        expected, window = recomputed(model, tokenizer, response.prompt_token_ids, ids, value)
        found = label_probability(generation.text, generation.logprobs or (), request.round)
        assert found.tokens == tuple(window)
        assert decision.confidence == pytest.approx(expected, abs=1e-4)
        assert (decision.stated_confidence, decision.confidence_source) == (1.0, "tokens")
        assert 0 < decision.confidence < 1  # type: ignore[operator]
        # the offline engine reads the same confidence for the same prompt
        [[completion]] = engine.swift.generate_completions(
            [Prompt(request.messages)], SamplingParams(max_tokens=request.max_tokens)
        )
        assert completion.text == generation.text
        assert completion.confidence(request.round) == pytest.approx(expected, abs=1e-4)
    # a Chinese label's characters span several tokens of this tokenizer: the U+FFFD case was exercised
    scene = served[1][1]
    assert scene.logprobs and any("\ufffd" in t for t, _ in scene.logprobs)
    assert decisions[0].is_fraud is True and decisions[1].scene == SCENE
