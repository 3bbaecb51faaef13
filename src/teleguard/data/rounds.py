"""Round samples: the three-round conversation about a call (or a prefix) as ms-swift JSONL rows.

Rounds: scene (only where the call has a scene label), is_fraud (always), fraud_type (fraud calls with a type).
As in SAFE-QAQ, each later round sees the earlier rounds' turns: the call and the first question, the reference
answer, the next question, and so on. The call goes into the first user message: as text (the transcript) or
as audio (one `<audio>` tag per clip, the clips listed in `audios`).

GRPO rows are prompt-only (`messages` ends with the round's question) and carry the ground truth for the
rewards: `answers` (scene name, fraud/normal, or fraud-type name), `conversation_stage`, plus `task` (the
round), `call_id` (the whole call's id, shared by its prefixes), `audio_idx` (which cut of the call: the
number of turns it holds) and `audio_length` (seconds of call audio in the prompt).

SFT rows hold the whole conversation with assistant targets for every round. Every target and reference answer
reasons from the call itself (teleguard.data.evidence): it quotes the decisive words the prompt shows, says
what they do and which pattern makes the label, and ends with the decision; no two calls share a think.

Real-time SFT rows (`sft_rows` of a real-time builder) are what the detector sends at a policy point
(teleguard.serve.policy builds its prompts with `question`): an early-stage prefix whose visible part holds no
salient evidence gets a null label with the prompt file's "information insufficient" reason, and a conversation
ends after a null is_fraud target, as the detector asks the fraud type only after a fraud answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from teleguard.contract import FRAUD, NORMAL, Mode, PromptSet, Round, Stage, format_answer
from teleguard.data.evidence import DEFAULT_QUOTE_CHARS, RationaleWriter
from teleguard.data.records import CallLabels, CallRecord

Modality = Literal["text", "audio"]


@dataclass(frozen=True)
class RoundTruth:
    round: Round
    answer: str  # the `answers` column: a scene, fraud/normal, or a fraud type
    label: str | bool  # the value of the round's JSON key


def round_truths(labels: CallLabels) -> list[RoundTruth]:
    truths = []
    if labels.scene is not None:
        truths.append(RoundTruth(Round.SCENE, labels.scene, labels.scene))
    truths.append(RoundTruth(Round.FRAUD, FRAUD if labels.is_fraud else NORMAL, labels.is_fraud))
    if labels.is_fraud and labels.fraud_type is not None:
        truths.append(RoundTruth(Round.FRAUD_TYPE, labels.fraud_type, labels.fraud_type))
    return truths


@dataclass(frozen=True)
class Sample:
    """A call or one of its prefixes, ready to be turned into rows."""

    call: CallRecord
    call_id: str  # the whole call's id
    stage: Stage
    audio_idx: int
    audio_length: float
    clips: Sequence[str] = ()  # audio clip paths (audio modality)


def sample_of_call(call: CallRecord, clips: Sequence[str] = ()) -> Sample:
    return Sample(
        call=call,
        call_id=call.call_id,
        stage=Stage.COMPLETE,
        audio_idx=len(call.turns),
        audio_length=float(call.duration or 0.0),
        clips=clips,
    )


class RowBuilder:
    """Turns samples into ms-swift rows with one prompt set, mode and modality.

    `chain_scene`: whether the is_fraud round continues the scene round's conversation (SAFE-QAQ's order) or
    opens its own. Chain only when every call has a scene label: if only normal calls had a scene round, the
    shape of the conversation would give the label away (and a model would learn that, not the call).
    `max_transcript_chars` cuts long transcripts (a CPU budget knob); `evidence_chars` is the longest quote of
    the call in the reference reasoning (default `DEFAULT_QUOTE_CHARS`). `writer` writes the reasoning: pass one
    writer to every builder of a dataset, so that no two of its calls share a think (default: the builder's own).
    """

    def __init__(
        self,
        prompts: PromptSet,
        mode: Mode,
        modality: Modality,
        *,
        system: bool = True,
        chain_scene: bool = False,
        max_transcript_chars: int | None = None,
        evidence_chars: int | None = None,
        writer: RationaleWriter | None = None,
    ) -> None:
        self.prompts, self.mode, self.modality, self.system = prompts, Mode(mode), modality, system
        self.chain_scene = chain_scene
        self.max_transcript_chars, self.evidence_chars = max_transcript_chars, evidence_chars
        self._writer = writer

    @property
    def writer(self) -> RationaleWriter:
        # made on first use: serving builds a RowBuilder per call only to ask questions
        if self._writer is None:
            self._writer = RationaleWriter(
                self.prompts, quote_chars=self.evidence_chars or DEFAULT_QUOTE_CHARS
            )
        return self._writer

    def question(
        self,
        round_: Round,
        *,
        first: bool,
        transcript: str | None = None,
        clips: int = 0,
        call_id: str = "",
    ) -> str:
        """One round's user message; the first round of a conversation carries the call.

        Public so that real-time serving builds exactly the prompts training used (teleguard.serve.policy).
        """
        if not first:
            return self.prompts.user_prompt(round_, self.mode, with_call=False)
        if self.modality == "audio":
            if clips < 1:
                raise ValueError(f"call {call_id}: the audio modality needs audio clips")
            question = self.prompts.user_prompt(round_, self.mode, audio=True)
            # one <audio> tag per clip: a model of the Qwen2-Audio class holds at most 30 s per clip
            return "<audio>" * (clips - 1) + question
        if not transcript:
            raise ValueError(f"call {call_id}: the text modality needs a transcript")
        return self.prompts.user_prompt(round_, self.mode, transcript=transcript[: self.max_transcript_chars])

    def _question(self, sample: Sample, round_: Round, first: bool) -> str:
        text = first and self.modality == "text" and bool(sample.call.turns)
        return self.question(
            round_,
            first=first,
            transcript=sample.call.transcript() if text else None,
            clips=len(sample.clips),
            call_id=sample.call_id,
        )

    def _answer(self, truth: RoundTruth, sample: Sample, *, allow_null: bool = False) -> tuple[str, bool]:
        """A round's reference answer, and whether it gives the label (`allow_null`: early prefixes may not)."""
        rationale = self.writer.write(
            sample.call,
            truth.round,
            truth.label,
            key=(sample.call_id, sample.audio_idx),
            stage=None if self.mode is not Mode.REALTIME else sample.stage,
            # quotes come from what the prompt shows (an audio prompt carries the whole cut)
            visible_chars=self.max_transcript_chars if self.modality == "text" else None,
            allow_null=allow_null,
        )
        answer = format_answer(
            truth.round,
            truth.label if rationale.label_given else None,
            stage=sample.stage,
            reason=rationale.reason,
            think=None if self.mode is Mode.DIRECT else rationale.think,
        )
        return answer, rationale.label_given

    def head(self) -> list[dict[str, str]]:
        """The messages before the first question: the system prompt, if the builder uses one."""
        return [{"role": "system", "content": self.prompts.system}] if self.system else []

    def _extra(self, sample: Sample) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "call_id": sample.call_id,
            "audio_idx": sample.audio_idx,
            "audio_length": round(sample.audio_length, 3),
        }
        if self.modality == "audio":
            extra["audios"] = list(sample.clips)
        return extra

    def conversations(self, labels: CallLabels) -> list[list[RoundTruth]]:
        """The rounds of a call, grouped into the conversations they are asked in."""
        truths = round_truths(labels)
        if self.chain_scene or truths[0].round is not Round.SCENE:
            return [truths]
        return [truths[:1], truths[1:]]

    def grpo_rows(self, sample: Sample) -> list[dict[str, Any]]:
        """One prompt-only row per round; each sees the earlier rounds of its conversation with reference answers."""
        rows = []
        for conversation in self.conversations(sample.call.labels):
            messages = self.head()
            for i, truth in enumerate(conversation):
                messages = [
                    *messages,
                    {"role": "user", "content": self._question(sample, truth.round, i == 0)},
                ]
                rows.append(
                    {
                        "messages": messages,
                        "answers": truth.answer,
                        "conversation_stage": str(sample.stage),
                        "task": truth.round.value,
                        **self._extra(sample),
                    }
                )
                if i + 1 < len(conversation):  # a reference answer before the next question: a label
                    answer, _ = self._answer(truth, sample)
                    messages = [*messages, {"role": "assistant", "content": answer}]
        return rows

    def sft_rows(self, sample: Sample) -> list[dict[str, Any]]:
        """Each conversation with an assistant target for every round (real-time: see the module docstring)."""
        rows = []
        realtime = self.mode is Mode.REALTIME
        for conversation in self.conversations(sample.call.labels):
            messages = self.head()
            for i, truth in enumerate(conversation):
                messages.append({"role": "user", "content": self._question(sample, truth.round, i == 0)})
                answer, given = self._answer(truth, sample, allow_null=realtime)
                messages.append({"role": "assistant", "content": answer})
                if not given and truth.round is Round.FRAUD:
                    break  # the detector asks the fraud type only after a fraud answer
            rows.append(
                {
                    "messages": messages,
                    "conversation_stage": str(sample.stage),
                    "mode": self.mode.value,
                    **self._extra(sample),
                }
            )
        return rows
