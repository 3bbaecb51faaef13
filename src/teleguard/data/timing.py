"""Turn times for transcripts that have none, from a speech rate.

Every later step (streaming prefixes, audio cuts, time-to-detection) works in seconds of call audio, so each
turn needs a start and an end. Without audio they are estimated: Chinese characters and English words are
spoken at configurable rates, and turns follow each other with a short gap.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from teleguard.data.records import CallRecord, Turn

_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[A-Za-z0-9]+")


class SpeechRate(BaseModel):
    """How fast people talk on the phone. Defaults: conversational Mandarin and English."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cjk_chars_per_s: float = Field(default=4.5, gt=0)
    words_per_s: float = Field(default=2.5, gt=0)
    gap_s: float = Field(default=0.4, ge=0, description="silence between turns")
    min_turn_s: float = Field(default=0.6, gt=0, description="floor for very short turns ('喂', 'ok')")

    def seconds(self, text: str) -> float:
        spoken = len(_CJK.findall(text)) / self.cjk_chars_per_s + len(_WORD.findall(text)) / self.words_per_s
        return max(spoken, self.min_turn_s)


def estimate_times(record: CallRecord, rate: SpeechRate | None = None) -> CallRecord:
    """The record with every turn timed; a record whose turns are all timed comes back unchanged."""
    if not record.turns or record.timed:
        return record
    rate = rate or SpeechRate()
    turns, clock = [], 0.0
    for i, turn in enumerate(record.turns):
        start = clock + (rate.gap_s if i else 0.0)
        end = start + rate.seconds(turn.text)
        turns.append(Turn(speaker=turn.speaker, text=turn.text, start=round(start, 3), end=round(end, 3)))
        clock = end
    meta = {**record.meta, "times": "estimated"}
    return record.model_copy(update={"turns": tuple(turns), "meta": meta})
