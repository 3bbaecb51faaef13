"""When to ask the model about a live call, what to ask, and what its answers mean.

At an evaluation point the policy asks the real-time rounds with the prompts training used (the contract's
real-time prompts through `teleguard.data.rounds.RowBuilder`, same system message, same transcript lines, one
`<audio>` tag per clip of at most 30 s):

1. scene (per `ask_scene`) and is_fraud: batched in one engine call, each opening its own conversation, or
   chained as SAFE-QAQ chains them (`chain_scene`: is_fraud follows the scene round's answer);
2. an alert is raised when is_fraud is true with confidence >= `alert_threshold` (a missing confidence counts as
   0, as in teleguard.evaluate). The confidence is the model's own probability of the label it wrote, from the
   answer tokens' log-probabilities the engine reports (`teleguard.contract.confidence`); the number the answer
   states is kept beside it (`Decision.stated_confidence`) and stands in only for an engine that reports no
   log-probabilities (`Decision.confidence_source` says which);
3. after an alert, while the call's fraud type is unknown, round 3 asks it, continuing the is_fraud
   conversation with the model's own answer where training had the reference answer;
4. after an alert the policy stops evaluating the call, unless `keep_monitoring_after_alert`.

Every answer is read with the contract's `parse_output`. Each request sent counts against `max_model_calls`
(counted when sent: the budget bounds cost, failed engine calls included). Engines plug in as an async
`generate(requests) -> answers` function (`teleguard.engines.contract.Generate`); everything else here is
synchronous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from teleguard.contract import STAGES, Mode, PromptSet, Round, Stage, load_prompts, parse_output
from teleguard.contract.confidence import read_confidence
from teleguard.contract.parser import ANSWER_END
from teleguard.data.rounds import RowBuilder
from teleguard.engines.contract import EngineRequest, Generate, Generation, as_generations
from teleguard.serve.protocol import Chunk, Decision, RequestError, Verdict
from teleguard.serve.session import CallSession

Modality = Literal["audio", "text"]


@dataclass(frozen=True)
class FeedResult:
    """What one chunk led to: `duplicate` for a retry (its earlier decisions are repeated), else new decisions."""

    seq: int
    duplicate: bool
    decisions: list[Decision] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """The call as the model sees it at one evaluation point."""

    seq: int
    audio_time: float
    modality: Modality
    transcript: str | None
    clips: tuple[np.ndarray, ...]


@cache
def _prompt_set(source: str) -> PromptSet:
    return load_prompts(source)


class DecisionPolicy(BaseModel):
    """The detector's decision rules (a server's configuration; validated when built)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: Literal["zh", "en"] = "zh"  # built-in prompts; an OpenCall's language overrides it per call
    # A prompt file the model was trained with (load_prompts); it wins over `language`.
    prompts_file: str | None = None
    modality: Literal["auto", "audio", "text"] = "auto"  # auto: the call's hint, else audio once any arrived
    # Training's prompt knobs: set them as the model's training data was built (teleguard data build).
    system: bool = True
    chain_scene: bool = False
    max_transcript_chars: int | None = Field(default=None, ge=1)
    # When to evaluate: every `every_seconds` of new call audio (or transcript time), and/or at each finished
    # turn; not before `min_turns` turns (text) or `min_audio_seconds` (audio) are there.
    every_seconds: float | None = Field(default=5.0, gt=0)
    on_turn: bool = True
    min_turns: int = Field(
        default=2, ge=0
    )  # a model's serving profile sets it as its training prefixes start
    min_audio_seconds: float = Field(default=0.0, ge=0)
    # when_normal: only once an is_fraud answer said normal, until known (training asks the scene of normal
    # calls only: asked of a fraud call, a model answers nonsense and costs a model call before the alert)
    ask_scene: Literal["always", "until_known", "when_normal", "never"] = "until_known"
    alert_threshold: float = Field(default=0.5, ge=0, le=1)
    keep_monitoring_after_alert: bool = False
    max_model_calls: int = Field(default=30, ge=1)  # per call
    evaluate_on_close: bool = True  # one last evaluation of what arrived since the previous one
    max_tokens: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> DecisionPolicy:
        if self.every_seconds is None and not self.on_turn:
            raise ValueError("set every_seconds or on_turn: otherwise the policy never evaluates a live call")
        if self.chain_scene and self.ask_scene != "always":
            raise ValueError(
                "chain_scene needs ask_scene='always': the chained is_fraud round follows a scene round"
            )
        if self.prompts_file is not None:
            _prompt_set(self.prompts_file)  # a bad prompt file fails when the server starts, not mid-call
        return self

    # --- prompts -----------------------------------------------------------------------------------------

    def prompts(self, session: CallSession | None = None) -> PromptSet:
        if self.prompts_file is not None:
            return _prompt_set(self.prompts_file)
        return _prompt_set((session.language if session else None) or self.language)

    def builder(self, session: CallSession, modality: Modality) -> RowBuilder:
        """The row builder training used for real-time rows, with this policy's knobs."""
        return RowBuilder(
            self.prompts(session),
            Mode.REALTIME,
            modality,
            system=self.system,
            chain_scene=self.chain_scene,
            max_transcript_chars=self.max_transcript_chars,
        )

    def modality_for(self, session: CallSession) -> Modality | None:
        """What the model gets for this call, or None while the call holds none of it."""
        wanted = self.modality if self.modality != "auto" else session.modality
        if wanted == "auto":
            wanted = "audio" if session.has_audio else "text"
        ready = session.has_audio if wanted == "audio" else session.has_transcript
        return wanted if ready else None

    # --- when --------------------------------------------------------------------------------------------

    def budget_left(self, session: CallSession) -> int:
        return max(0, self.max_model_calls - session.model_calls)

    def pending(self, session: CallSession) -> bool:
        """Whether anything arrived since the last evaluation that the model would see."""
        arrived = (
            session.audio_time > session.evaluated_time
            or session.segments_received > session.evaluated_segments
        )
        return arrived and not self._unchanged(session)

    def _window(self, session: CallSession) -> str:
        """The transcript as the prompt holds it (cut to `max_transcript_chars`)."""
        return session.transcript()[: self.max_transcript_chars]

    def _unchanged(self, session: CallSession) -> bool:
        """Whether the model would be shown exactly what it saw last time: a text call past the transcript
        window. Asking again would cost a model call for the same prompt, so the new content is taken as
        evaluated instead."""
        if self.max_transcript_chars is None or session.evaluated_window is None:
            return False
        if self.modality_for(session) != "text" or self._window(session) != session.evaluated_window:
            return False
        self.mark_evaluated(session, "text")
        return True

    def due(self, session: CallSession) -> str | None:
        """Why the call should be evaluated now ("turn" or "audio"), or None."""
        if session.closed or session.stopped or session.evaluating or not self.budget_left(session):
            return None
        modality = self.modality_for(session)
        if modality is None:
            return None
        if modality == "text" and session.segments_received < self.min_turns:
            return None
        if modality == "audio" and session.audio_seconds < self.min_audio_seconds:
            return None
        reason = None
        if self.on_turn and session.segments_received > session.evaluated_segments:
            reason = "turn"
        elif (
            self.every_seconds is not None
            and session.audio_time - session.evaluated_time >= self.every_seconds
        ):
            reason = "audio"
        return None if reason is None or self._unchanged(session) else reason

    def mark_evaluated(self, session: CallSession, modality: Modality) -> None:
        """What `due` and `pending` compare against: the call as far as it has now been evaluated."""
        session.evaluated_time = session.audio_time
        session.evaluated_segments = session.segments_received
        session.evaluated_window = self._window(session) if modality == "text" else None

    def _snapshot(self, session: CallSession, modality: Modality, seq: int) -> Snapshot:
        self.mark_evaluated(session, modality)
        return Snapshot(
            seq=seq,
            audio_time=session.audio_time,
            modality=modality,
            transcript=session.transcript() if modality == "text" else None,
            clips=tuple(session.clips()) if modality == "audio" else (),
        )

    # --- what to ask -------------------------------------------------------------------------------------

    def _wants_scene(self, session: CallSession) -> bool:
        if self.ask_scene == "when_normal":
            return session.is_fraud is False and session.scene is None
        return self.ask_scene == "always" or (self.ask_scene == "until_known" and session.scene is None)

    def first_messages(self, session: CallSession, snap: Snapshot, round_: Round) -> list[dict[str, str]]:
        """A conversation's opening: the system prompt and the round's question carrying the call."""
        builder = self.builder(session, snap.modality)
        question = builder.question(
            round_, first=True, transcript=snap.transcript, clips=len(snap.clips), call_id=session.call_id
        )
        return [*builder.head(), {"role": "user", "content": question}]

    def follow_up(
        self, session: CallSession, snap: Snapshot, history: list[dict[str, str]], answer: str, round_: Round
    ) -> list[dict[str, str]]:
        """A conversation continued: the model's own answer to the last round, then the next round's question."""
        question = self.builder(session, snap.modality).question(round_, first=False)
        return [
            *history,
            {"role": "assistant", "content": _clean(answer)},
            {"role": "user", "content": question},
        ]

    def _request(
        self, session: CallSession, snap: Snapshot, round_: Round, messages: list[dict[str, str]]
    ) -> EngineRequest:
        return EngineRequest(session.call_id, round_, messages, snap.clips, self.max_tokens)

    # --- asking ------------------------------------------------------------------------------------------

    async def feed(self, session: CallSession, chunk: Chunk, generate: Generate) -> FeedResult:
        """Take one chunk (RequestError for a bad one) and evaluate the call if a policy point is reached.

        While an evaluation of the call is in flight, new chunks are stored and evaluated at the next point.
        """
        if not session.receive(chunk):
            return FeedResult(chunk.seq, True, session.decisions_for(chunk.seq))
        if self.due(session) is None:
            return FeedResult(chunk.seq, False)
        return FeedResult(chunk.seq, False, await self.evaluate(session, generate, seq=chunk.seq))

    async def evaluate(
        self, session: CallSession, generate: Generate, *, seq: int | None = None
    ) -> list[Decision]:
        """Ask the rounds about the call as it is now (ignoring `due`, not the budget). Returns the decisions."""
        modality = self.modality_for(session)
        if modality is None or session.evaluating or not self.budget_left(session):
            return []
        marks = session.evaluated_time, session.evaluated_segments, len(session.decisions)
        window = session.evaluated_window
        snap = self._snapshot(session, modality, session.next_seq - 1 if seq is None else seq)
        session.evaluating = True
        try:
            return await self._ask(session, snap, generate)
        except BaseException:
            # the engine failed before any answer: the content counts as not evaluated, so the next chunk
            # tries again (after a partial answer it counts as evaluated, to not raise an alert twice)
            if len(session.decisions) == marks[2]:
                session.evaluated_time, session.evaluated_segments = marks[:2]
                session.evaluated_window = window
            raise
        finally:
            session.evaluating = False

    async def _ask(self, session: CallSession, snap: Snapshot, generate: Generate) -> list[Decision]:
        decisions: list[Decision] = []
        scene = self._wants_scene(session) and self.budget_left(session) >= 2
        if self.chain_scene and scene:
            messages = self.first_messages(session, snap, Round.SCENE)
            [answer], latency = await self._generate(
                session, generate, [self._request(session, snap, Round.SCENE, messages)]
            )
            decisions.append(self.decide(session, snap, Round.SCENE, answer, latency))
            fraud_messages = self.follow_up(session, snap, messages, answer.text, Round.FRAUD)
            [fraud], latency = await self._generate(
                session, generate, [self._request(session, snap, Round.FRAUD, fraud_messages)]
            )
        else:
            # no scene round, or scene and is_fraud in separate conversations: one batched engine call
            fraud_messages = self.first_messages(session, snap, Round.FRAUD)
            requests = [self._request(session, snap, Round.FRAUD, fraud_messages)]
            if scene:
                requests.append(
                    self._request(session, snap, Round.SCENE, self.first_messages(session, snap, Round.SCENE))
                )
            answers, latency = await self._generate(session, generate, requests)
            fraud = answers[0]
            if scene:  # first, so that the is_fraud decision carries this scene
                decisions.append(self.decide(session, snap, Round.SCENE, answers[1], latency))
        decision = self.decide(session, snap, Round.FRAUD, fraud, latency)
        decisions.append(decision)
        if decision.alert and not self.keep_monitoring_after_alert:
            session.stopped = True  # before round 3: an engine failure there must not re-open evaluation
        if decision.alert and session.fraud_type is None and self.budget_left(session) >= 1:
            messages = self.follow_up(session, snap, fraud_messages, fraud.text, Round.FRAUD_TYPE)
            [kind], latency = await self._generate(
                session, generate, [self._request(session, snap, Round.FRAUD_TYPE, messages)]
            )
            decisions.append(self.decide(session, snap, Round.FRAUD_TYPE, kind, latency))
        return decisions

    async def _generate(
        self, session: CallSession, generate: Generate, requests: list[EngineRequest]
    ) -> tuple[list[Generation], float]:
        session.model_calls += len(requests)
        start = time.perf_counter()
        answers = list(await generate(requests))
        return as_generations(answers, len(requests)), time.perf_counter() - start

    # --- what it means -----------------------------------------------------------------------------------

    def decide(
        self, session: CallSession, snap: Snapshot, round_: Round, answer: Generation, latency: float
    ) -> Decision:
        """Read one answer with the contract's parser, update the call's picture, and record the decision.

        The decision's confidence is the label's token probability when the engine reported log-probabilities
        (None, with a problem, when the answer has no label span), else the stated number; an alert needs
        is_fraud true and that confidence >= `alert_threshold`.
        """
        parsed = parse_output(answer.text, round_)
        problems = list(parsed.problems)
        label = parsed.canonical_label
        if label is None and parsed.label is not None:
            problems.append(f"{round_.value} {parsed.label!r} is not a label; read as null")
        if parsed.confidence is not None and not 0 <= parsed.confidence <= 1:
            problems.append(f"confidence {parsed.confidence} is outside [0, 1]; read as missing")
        read = read_confidence(answer.text, round_, answer.logprobs)
        if read.problem:
            problems.append(f"confidence: {read.problem}")
        confidence = read.value
        stage = Stage(parsed.conversation_stage) if parsed.conversation_stage in STAGES else None
        if round_ is Round.SCENE and label is not None:
            session.scene = label  # type: ignore[assignment]
        elif round_ is Round.FRAUD and label is not None:
            session.is_fraud = label  # type: ignore[assignment]
        elif round_ is Round.FRAUD_TYPE and label is not None:
            session.fraud_type = label  # type: ignore[assignment]
        alert = round_ is Round.FRAUD and label is True and (confidence or 0.0) >= self.alert_threshold
        if alert:
            session.alerts += 1
            if session.first_alert_time is None:
                session.first_alert_time = snap.audio_time
        # this round's field holds this answer; the other two the call's latest valid answers
        picture = {"scene": session.scene, "is_fraud": session.is_fraud, "fraud_type": session.fraud_type}
        picture[round_.value] = label
        if round_ is Round.FRAUD_TYPE:
            picture["is_fraud"] = True  # round 3 is asked only after a fraud alert
        decision = Decision(
            call_id=session.call_id,
            seq=snap.seq,
            round=round_,
            conversation_stage=stage,
            confidence=confidence,
            stated_confidence=read.stated,
            confidence_source=read.source,
            reason=parsed.reason,
            alert=alert,
            insufficient=parsed.insufficient,
            audio_time=snap.audio_time,
            latency_s=latency,
            tokens=answer.tokens,
            problems=problems,
            **picture,
        )
        session.decisions.append(decision)
        return decision

    # --- the end of a call -------------------------------------------------------------------------------

    async def close(
        self, session: CallSession, generate: Generate, *, last_seq: int | None = None
    ) -> tuple[list[Decision], Verdict]:
        """Close the call: one last evaluation of what is new (per `evaluate_on_close`), then the verdict.

        Closing twice returns the first verdict. `last_seq` (the client's last chunk) must match what arrived.
        """
        if session.closed:
            return [], session.verdict or self.verdict(session)
        if last_seq is not None and last_seq != session.next_seq - 1:
            raise RequestError(
                "sequence_gap",
                f"call {session.call_id}: the client's last chunk is {last_seq}, the detector has received up to "
                f"{session.next_seq - 1}; send the missing chunks before closing",
                field="last_seq",
            )
        decisions: list[Decision] = []
        if self.evaluate_on_close and not session.stopped and self.pending(session):
            decisions = await self.evaluate(session, generate)
        session.close()
        session.verdict = self.verdict(session)
        return decisions, session.verdict

    def verdict(self, session: CallSession) -> Verdict:
        """The call's verdict from its decisions so far (no model call).

        Fraud when any alert was raised: confidence and reason of the most confident alert. Otherwise normal,
        resting on the last is_fraud answer: its confidence when it said normal, 1 - confidence when it said
        fraud below the threshold, none when there was no answer.
        """
        alerts = [d for d in session.decisions if d.alert]
        answered = [d for d in session.decisions if d.round is Round.FRAUD and d.is_fraud is not None]
        confidence: float | None = None
        reason: str | None = None
        if alerts:
            basis = max(alerts, key=lambda d: d.confidence or 0.0)
            confidence, reason = basis.confidence, basis.reason
        elif answered:
            basis = answered[-1]
            reason = basis.reason
            if basis.confidence is not None:
                confidence = basis.confidence if basis.is_fraud is False else 1.0 - basis.confidence
        return Verdict(
            call_id=session.call_id,
            is_fraud=bool(alerts),
            fraud_type=session.fraud_type if alerts else None,
            scene=session.scene,
            confidence=confidence,
            reason=reason,
            first_alert_time=session.first_alert_time,
            alerts=session.alerts,
            decisions=len(session.decisions),
            model_calls=session.model_calls,
            audio_seconds=session.audio_time,
            chunks=session.next_seq,
        )


def _clean(answer: str) -> str:
    """A model answer as the next round's history: trimmed, nothing after the first </answer>."""
    end = answer.find(ANSWER_END)
    return (answer[: end + len(ANSWER_END)] if end >= 0 else answer).strip()
