"""The streaming protocol of live calls, as pydantic models, and the one error type requests fail with.

A client opens a call (`OpenCall`), sends `Chunk`s numbered 0, 1, 2, ... (16 kHz PCM16 audio, a WAV file,
and/or finished transcript segments), receives `Decision`s whenever the detector asks the model, and closes
the call (`CloseCall`) for a final `Verdict`. After a reconnect it asks where the call stands (`ResumeCall`). Everything a client can get wrong is a `RequestError` with a
machine-readable `reason`, an HTTP `status` and a message naming the field.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from teleguard.contract import Round, Stage

SAMPLE_RATE = 16_000  # what the models were trained on (teleguard.data.audio); the only rate accepted

# reason code -> HTTP status. 400: the request itself is wrong; 404/409: it does not fit the call's state;
# 413: too big; 429: the detector is full.
REASON_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_base64": 400,
    "wrong_sample_rate": 400,
    "wrong_channels": 400,
    "not_audio": 400,
    "invalid_pcm": 400,
    "invalid_segment": 400,
    "empty_chunk": 400,
    "payload_too_large": 413,
    "unknown_call": 404,
    "closed_call": 409,
    "call_exists": 409,
    "sequence_gap": 409,
    "out_of_order": 409,
    "too_many_calls": 429,
}


class RequestError(Exception):
    """A request the detector refuses: `reason` (a key of REASON_STATUS), HTTP `status`, `field` if one is at fault."""

    def __init__(
        self, reason: str, message: str, *, field: str | None = None, status: int | None = None
    ) -> None:
        if reason not in REASON_STATUS and status is None:
            raise ValueError(
                f"unknown reason {reason!r}: give a status or use one of {sorted(REASON_STATUS)}"
            )
        super().__init__(message)
        self.reason = reason
        self.status = status if status is not None else REASON_STATUS[reason]
        self.field = field
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of an error response."""
        return {"error": self.reason, "status": self.status, "field": self.field, "message": self.message}

    def __repr__(self) -> str:
        return f"RequestError({self.reason!r}, {self.message!r}, field={self.field!r}, status={self.status})"


class _Message(BaseModel):
    # Unknown fields are rejected: a misspelt field name would otherwise be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


CallId = str
_CALL_ID = r"^[\w.:@/+-]{1,128}$"


def new_call_id() -> str:
    return uuid.uuid4().hex


class OpenCall(_Message):
    """Start monitoring a call. Omitted `call_id` is generated; `language` and `modality` override the server's."""

    call_id: CallId = Field(default_factory=new_call_id, pattern=_CALL_ID)
    language: Literal["zh", "en"] | None = None  # prompt language; None: the server's default
    # What the detector should listen to: "audio" (the model hears the call), "text" (the transcript), or
    # "auto": audio once any arrived, else the transcript. The server's policy may pin one.
    modality: Literal["auto", "audio", "text"] = "auto"
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        # metadata is kept for the whole call: bound it so one client cannot grow the detector's memory.
        if len(value) > 32:
            raise ValueError(f"at most 32 entries, got {len(value)}")
        for key, item in value.items():
            if len(key) > 64 or (isinstance(item, str) and len(item) > 1024):
                raise ValueError(f"entry {key[:64]!r}: keys hold at most 64 characters and values 1024")
        return value


class Segment(_Message):
    """One finished turn of the transcript: who spoke, what, and when (seconds of call audio)."""

    # "left" / "right": the stereo channel (TeleAntiFraud puts the caller on the left), rendered as training
    # renders it; any other name is written as given.
    speaker: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1)
    start: float = Field(ge=0, allow_inf_nan=False)
    end: float = Field(ge=0, allow_inf_nan=False)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Segment:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self


class Chunk(_Message):
    """The next piece of a live call. `seq` counts a call's chunks from 0, so retries and gaps can be told apart.

    Audio comes as `audio` (base64 of raw PCM16 little-endian samples, `channels` interleaved, `sample_rate`
    16000) or `wav` (base64 of a WAV file, 16 kHz, mono or stereo), not both; `segments` are finished turns.
    """

    call_id: CallId = Field(pattern=_CALL_ID)
    seq: int = Field(ge=0)
    audio: str | None = None
    wav: str | None = None
    channels: int = 1  # of `audio`; 1 or 2 (checked when decoding, with reason wrong_channels)
    sample_rate: int = SAMPLE_RATE  # of `audio`; must be 16000 (checked when decoding)
    segments: list[Segment] = Field(default_factory=list)


class CloseCall(_Message):
    """The call ended. `last_seq`, when given, lets the detector check that no chunk went missing."""

    call_id: CallId = Field(pattern=_CALL_ID)
    last_seq: int | None = Field(default=None, ge=-1)  # -1: no chunk was sent


class ResumeCall(_Message):
    """A client reconnected (to any replica, with a shared store) and asks where its call stands: the answer
    names the last chunk the detector took, so the client resends from the one after it."""

    call_id: CallId = Field(pattern=_CALL_ID)


class Decision(_Message):
    """What the model concluded at one evaluation point, for one round.

    `is_fraud`, `scene` and `fraud_type` are the call's picture after this decision (the latest valid answer
    of each round so far); `label` is this round's own answer. `alert` is set on an is_fraud decision that
    says fraud with confidence >= the policy's threshold.

    `confidence` is the model's own probability of this round's label: exp of the summed log-probabilities of
    the tokens that spell the label's JSON literal (`teleguard.contract.confidence`), None when the answer
    has no label span (a problem says why). `stated_confidence` is the number the answer JSON states. An
    engine that reports no log-probabilities leaves `confidence` to the stated number; `confidence_source`
    says which it is ("tokens" or "stated").
    """

    call_id: CallId
    seq: int  # the chunk whose arrival (or the close) triggered the evaluation; -1 if none had arrived
    round: Round
    conversation_stage: Stage | None = None  # as the model judged it
    is_fraud: bool | None = None
    fraud_type: str | None = None
    scene: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    stated_confidence: float | None = Field(default=None, ge=0, le=1)  # the answer JSON's own number
    confidence_source: Literal["tokens", "stated"] = "tokens"
    reason: str | None = None
    alert: bool = False
    insufficient: bool = False  # the model said it needs more of the call
    audio_time: float = Field(ge=0)  # seconds of call audio (or transcript time) the model had seen
    latency_s: float = Field(ge=0)  # wall time of the engine call that produced this answer
    tokens: int | None = None  # tokens generated, when the engine reports them
    problems: list[str] = Field(default_factory=list)  # what was wrong with the model's output, if anything

    @property
    def label(self) -> str | bool | None:
        """This round's answer (canonical name, or bool for is_fraud); None when null or invalid."""
        return {Round.SCENE: self.scene, Round.FRAUD: self.is_fraud, Round.FRAUD_TYPE: self.fraud_type}[
            self.round
        ]


class Verdict(_Message):
    """The final word on a closed (or expired) call.

    The call is fraud when any alert was raised; `confidence` and `reason` come from the decision the verdict
    rests on (the most confident alert, else the last is_fraud answer).
    """

    call_id: CallId
    is_fraud: bool
    fraud_type: str | None = None
    scene: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    reason: str | None = None
    first_alert_time: float | None = None  # seconds of call audio at the first alert
    alerts: int = 0
    decisions: int = 0
    model_calls: int = 0
    audio_seconds: float = 0.0  # call audio (or transcript time) received
    chunks: int = 0


M = TypeVar("M", bound=BaseModel)


def field_name(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the dotted field path a client sent (segments.2.end)."""
    return ".".join(str(part) for part in loc) or "(body)"


def parse_message(model: type[M], data: Any) -> M:
    """A protocol message from a mapping or JSON text; any problem is a RequestError naming the field.

    Errors inside `segments` have reason `invalid_segment`; all others `invalid_request`.
    """
    try:
        if isinstance(data, str | bytes | bytearray):
            return model.model_validate_json(data)
        if not isinstance(data, dict):
            raise RequestError(
                "invalid_request", f"{model.__name__}: expected a JSON object, got {type(data).__name__}"
            )
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = errors[0] if errors else {"loc": (), "msg": str(err)}
        where = field_name(tuple(first["loc"]))
        reason = "invalid_segment" if first["loc"][:1] == ("segments",) else "invalid_request"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise RequestError(
            reason, f"{model.__name__}: field '{where}': {first['msg']}{more}", field=where
        ) from None
    except RequestError:
        raise
    except (ValueError, TypeError, RecursionError) as err:  # pathological input pydantic does not wrap
        raise RequestError("invalid_request", f"{model.__name__}: {type(err).__name__}: {err}") from None
