"""The call record: teleguard's own interchange format for calls.

One call is one JSON object per line (`calls.jsonl`):

    {"call_id": "fraud_dialogues-20250228_023012/tts_fraud_00079",
     "source": "teleantifraud-dialogues",
     "turns": [{"speaker": "left", "text": "您好，这里是顺丰快递客服……", "start": 0.0, "end": 6.2}, ...],
     "labels": {"is_fraud": true, "scene": null, "fraud_type": "邮件诈骗"},
     "audio": "audio/fraud_dialogues-20250228_023012/tts_fraud_00079.wav",
     "callee": {"age": 22, "awareness": "低", "occupation": "失业人员"},
     "meta": {"termination_reason": "...", "terminator": "user end"}}

- `speaker` is the channel the speaker is on: "left" or "right" (TeleAntiFraud puts the caller on the left).
- `start`/`end` are seconds from the start of the call; null until timed (see teleguard.data.timing).
- `labels.scene` and `labels.fraud_type` are canonical Chinese names (teleguard.contract.labels) or null where the
  source does not say; `is_fraud` is always known.
- `audio` is a stereo 16 kHz WAV, one speaker per channel, relative to the calls file's folder (or a URI).
- A call has turns, audio, or both (TeleAntiFraud-28k release rows have audio and no transcript).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teleguard.contract.labels import FRAUD_TYPE_NAMES, SCENE_NAMES

Speaker = Literal["left", "right"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Turn(_Record):
    speaker: Speaker
    text: str = Field(min_length=1)
    start: float | None = Field(default=None, ge=0)
    end: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Turn:
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self

    @property
    def timed(self) -> bool:
        return self.start is not None and self.end is not None


class CallLabels(_Record):
    is_fraud: bool
    scene: str | None = None
    fraud_type: str | None = None

    @field_validator("scene")
    @classmethod
    def _known_scene(cls, value: str | None) -> str | None:
        if value is not None and value not in SCENE_NAMES:
            raise ValueError(f"unknown scene {value!r}; expected one of {', '.join(SCENE_NAMES)}")
        return value

    @field_validator("fraud_type")
    @classmethod
    def _known_fraud_type(cls, value: str | None) -> str | None:
        if value is not None and value not in FRAUD_TYPE_NAMES:
            raise ValueError(f"unknown fraud type {value!r}; expected one of {', '.join(FRAUD_TYPE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CallLabels:
        if self.fraud_type is not None and not self.is_fraud:
            raise ValueError("a normal call (is_fraud false) cannot have a fraud_type")
        return self

    @property
    def name(self) -> str:
        """One label for counting and stratifying: the fraud type, else the scene, else fraud/normal."""
        return self.fraud_type or self.scene or ("fraud" if self.is_fraud else "normal")


class Callee(_Record):
    age: int | None = Field(default=None, ge=0, le=130)
    awareness: str | None = None
    occupation: str | None = None


class CallRecord(_Record):
    call_id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    turns: tuple[Turn, ...] = ()
    labels: CallLabels
    audio: str | None = None
    callee: Callee | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_content(self) -> CallRecord:
        # Release rows of TeleAntiFraud-28k carry audio without a transcript; everything else has turns.
        if not self.turns and self.audio is None:
            raise ValueError("a call needs turns or audio")
        return self

    @property
    def timed(self) -> bool:
        return bool(self.turns) and all(turn.timed for turn in self.turns)

    @property
    def duration(self) -> float | None:
        """Seconds of call audio (the end of the last turn), if the call is timed."""
        return self.turns[-1].end if self.timed else self.meta.get("audio_seconds")

    def transcript(self, upto: int | None = None) -> str:
        """The turns as text, one per line, "左：" / "右：" marking the channel."""
        marks = {"left": "左", "right": "右"}
        return "\n".join(f"{marks[t.speaker]}：{t.text}" for t in self.turns[:upto])
