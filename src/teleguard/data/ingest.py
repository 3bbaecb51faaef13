"""Ingestion of call data into `CallRecord`s, with validation that names file, line and field.

Formats:
- `dialogues`: TeleAntiFraud transcript JSONL (`tts_id`, `left`, `right`, `fraud_type`, callee fields). In
  `fraud_dialogues-*` files `fraud_type` is the fraud type, in `normal_dialogues-*` files it is the scene; in a
  file named otherwise the value itself decides. Ids repeat across files, so a call id is `<file stem>/<tts_id>`.
- `sft`: TeleAntiFraud-28k multi-turn `sft.jsonl`: ms-swift `messages` (2, 4 or 6: user/assistant rounds) with
  `audios`. The labels are read from the assistant answers with the contract's parser.
- `binary`: TeleAntiFraud-28k binary-classification JSON (a list, or JSON lines) of objects with an audio path
  (`audio`, `audio_path`, `path` or `audios`) and a label (`label`/`is_fraud`/`answer`: 1/0, true/false,
  fraud/normal, 诈骗/正常, 是/否).
- `teleguard`: teleguard's own calls JSONL (teleguard.data.records).

Every rejected row is reported as `file:line: field 'x': what is wrong`. With `on_error="skip"` the good rows
are kept and the rejections counted; with `on_error="fail"` an `IngestError` carries every rejection.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teleguard.contract import FRAUD_TYPE_NAMES, SCENE_NAMES, Round, parse_output
from teleguard.data.records import Callee, CallLabels, CallRecord, Turn

Format = Literal["dialogues", "sft", "binary", "teleguard"]
FORMATS: tuple[str, ...] = ("dialogues", "sft", "binary", "teleguard")
OnError = Literal["fail", "skip"]


@dataclass(frozen=True)
class Rejection:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{self.path}:{self.line}: {where}{self.message}"


@dataclass
class IngestReport:
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, path: str, ok: bool) -> None:
        stats = self.per_file.setdefault(path, {"accepted": 0, "rejected": 0})
        stats["accepted" if ok else "rejected"] += 1
        if ok:
            self.accepted += 1


class IngestError(ValueError):
    def __init__(self, report: IngestReport) -> None:
        self.report = report
        shown = "\n".join(f"  {r}" for r in report.rejected[:50])
        more = f"\n  ... and {len(report.rejected) - 50} more" if len(report.rejected) > 50 else ""
        super().__init__(
            f"{len(report.rejected)} row(s) rejected, {report.accepted} accepted:\n{shown}{more}\n"
            "(use on_error='skip' / --skip to keep the good rows)"
        )


class RowError(ValueError):
    """One bad row: which field and what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _validation_rows(err: ValidationError) -> RowError:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return RowError(loc, message)


# ------------------------------------------------------------------------------------------------- dialogues


class _DialogueRow(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    tts_id: str = Field(min_length=1)
    left: list[str] = Field(min_length=1)
    right: list[str]
    fraud_type: str
    user_age: int | None = None
    user_awareness: str | None = None
    occupation: str | None = None
    termination_reason: str | None = None
    terminator: str | None = None


def _dialogue_record(row: Any, path: Path) -> CallRecord:
    try:
        d = _DialogueRow.model_validate(row)
    except ValidationError as err:
        raise _validation_rows(err) from None
    value = d.fraud_type
    kind = "fraud" if path.name.startswith("fraud") else "normal" if path.name.startswith("normal") else None
    if kind == "fraud" or (kind is None and value in FRAUD_TYPE_NAMES):
        if value not in FRAUD_TYPE_NAMES:
            raise RowError(
                "fraud_type", f"unknown fraud type {value!r} (a fraud file holds one of the 8 types)"
            )
        labels = CallLabels(is_fraud=True, fraud_type=value)
    elif kind == "normal" or value in SCENE_NAMES:
        if value not in SCENE_NAMES:
            raise RowError("fraud_type", f"unknown scene {value!r} (a normal file holds one of the 7 scenes)")
        labels = CallLabels(is_fraud=False, scene=value)
    else:
        raise RowError("fraud_type", f"{value!r} is neither a fraud type nor a scene")

    turns: list[Turn] = []
    dropped = 0
    for i in range(max(len(d.left), len(d.right))):
        for speaker, side in (("left", d.left), ("right", d.right)):
            if i < len(side):
                text = side[i].strip()
                if text:
                    turns.append(Turn(speaker=speaker, text=text))
                else:
                    dropped += 1  # an empty utterance is silence: nothing to say, nothing to keep
    if not turns:
        raise RowError("left", "every turn is empty")
    meta: dict[str, Any] = {k: v for k, v in (d.model_extra or {}).items()}
    meta.update(tts_id=d.tts_id, termination_reason=d.termination_reason, terminator=d.terminator)
    if dropped:
        meta["dropped_empty_turns"] = dropped
    callee = None
    if d.user_age is not None or d.user_awareness or d.occupation:
        try:
            callee = Callee(age=d.user_age, awareness=d.user_awareness, occupation=d.occupation)
        except ValidationError as err:
            field_error = _validation_rows(err)
            raise RowError(
                {"age": "user_age"}.get(field_error.field, field_error.field), str(field_error)
            ) from None
    return CallRecord(
        call_id=f"{path.stem}/{d.tts_id}",
        source="teleantifraud-dialogues",
        turns=tuple(turns),
        labels=labels,
        callee=callee,
        meta={k: v for k, v in meta.items() if v is not None},
    )


# ----------------------------------------------------------------------------------------------------- sft


def _sft_record(row: Any, path: Path, line: int) -> CallRecord:
    if not isinstance(row, dict):
        raise RowError("", f"a row is a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) not in (2, 4, 6):
        raise RowError("messages", "must be a list of 2, 4 or 6 messages (user/assistant rounds)")
    audios = row.get("audios")
    if not isinstance(audios, list) or not audios or not all(isinstance(a, str) and a for a in audios):
        raise RowError("audios", "must be a non-empty list of audio paths")
    labels: dict[str, Any] = {}
    for i, message in enumerate(messages):
        expected_role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected_role:
            raise RowError(f"messages.{i}.role", f"must be {expected_role!r}")
        if not isinstance(message.get("content"), str):
            raise RowError(f"messages.{i}.content", "must be a string")
        if expected_role == "assistant":
            parsed = parse_output(message["content"])
            if parsed.round is None or parsed.label is None:
                raise RowError(f"messages.{i}.content", "the answer names no scene, is_fraud or fraud_type")
            labels[parsed.round.value] = parsed.label
    is_fraud = labels.get(Round.FRAUD.value)
    if not isinstance(is_fraud, bool):
        fraud_type = labels.get(Round.FRAUD_TYPE.value)
        if fraud_type is None:
            raise RowError("messages", "no round answers is_fraud, so the call's label is unknown")
        is_fraud = True  # a row that asks for the fraud type is about a fraud call
    try:
        call_labels = CallLabels(
            is_fraud=is_fraud,
            scene=labels.get(Round.SCENE.value),
            fraud_type=labels.get(Round.FRAUD_TYPE.value),
        )
    except ValidationError as err:
        raise RowError("messages", str(_validation_rows(err))) from None
    audio = _audio_path(audios[0], path)
    return CallRecord(
        call_id=str(row.get("id") or f"{path.stem}/{line}"),
        source="teleantifraud-28k-sft",
        labels=call_labels,
        audio=audio,
        meta={
            "rounds": len(messages) // 2,
            **({"clips": [_audio_path(a, path) for a in audios]} if len(audios) > 1 else {}),
        },
    )


def _audio_path(audio: str, source: Path) -> str:
    """Release files name audio relative to themselves: make such paths independent of the working directory."""
    if "://" in audio or Path(audio).is_absolute():
        return audio
    return str((source.parent / audio).resolve())


# -------------------------------------------------------------------------------------------------- binary

_TRUE = {"1", "true", "fraud", "诈骗", "是", "yes"}
_FALSE = {"0", "false", "normal", "正常", "否", "no", "非诈骗", "不是诈骗"}


def _binary_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    # Exact matches only: "不正常" must not read as "正常".
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"cannot read {value!r} as fraud/normal")


def _binary_record(row: Any, path: Path, line: int) -> CallRecord:
    if not isinstance(row, dict):
        raise RowError("", f"a row is a JSON object, got {type(row).__name__}")
    audio_key = next((k for k in ("audio", "audio_path", "path", "audios") if k in row), None)
    if audio_key is None:
        raise RowError("audio", "missing: one of audio, audio_path, path, audios")
    audio = row[audio_key]
    if isinstance(audio, list):
        audio = audio[0] if audio else None
    if not isinstance(audio, str) or not audio:
        raise RowError(audio_key, "must be an audio path")
    label_key = next((k for k in ("label", "is_fraud", "answer") if k in row), None)
    if label_key is None:
        raise RowError("label", "missing: one of label, is_fraud, answer")
    try:
        is_fraud = _binary_label(row[label_key])
    except ValueError as err:
        raise RowError(label_key, str(err)) from None
    return CallRecord(
        call_id=str(row.get("id") or f"{path.stem}/{line}"),
        source="teleantifraud-28k-binary",
        labels=CallLabels(is_fraud=is_fraud),
        audio=_audio_path(audio, path),
    )


def _teleguard_record(row: Any, path: Path, line: int) -> CallRecord:
    try:
        return CallRecord.model_validate(row)
    except ValidationError as err:
        raise _validation_rows(err) from None


# ------------------------------------------------------------------------------------------------- driver


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed row) for JSON lines, or for the items of a JSON array file (line = item number)."""
    with path.open(encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            try:
                items = json.load(f)
            except json.JSONDecodeError as err:
                yield err.lineno, err
                return
            yield from enumerate(items, start=1)
            return
        for number, text in enumerate(f, start=1):
            if text.strip():
                try:
                    yield number, json.loads(text)
                except json.JSONDecodeError as err:
                    yield number, err


_READERS: dict[str, Callable[[Any, Path, int], CallRecord]] = {
    "dialogues": lambda row, path, line: _dialogue_record(row, path),
    "sft": _sft_record,
    "binary": _binary_record,
    "teleguard": _teleguard_record,
}


def ingest(
    paths: list[Path], fmt: Format, *, on_error: OnError = "fail"
) -> tuple[list[CallRecord], IngestReport]:
    """Read every file; every call id must be unique across them."""
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reader = _READERS[fmt]
    report = IngestReport()
    calls: list[CallRecord] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        for line, row in _rows(path):
            try:
                if isinstance(row, json.JSONDecodeError):
                    raise RowError("", f"not valid JSON: {row.msg} at column {row.colno}")
                record = reader(row, path, line)
                if record.call_id in seen:
                    raise RowError(
                        "call_id", f"duplicate call id {record.call_id!r} (first at {seen[record.call_id]})"
                    )
            except RowError as err:
                report.rejected.append(Rejection(str(path), line, err.field, str(err)))
                report.count(str(path), ok=False)
                continue
            except ValidationError as err:
                bad = _validation_rows(err)
                report.rejected.append(Rejection(str(path), line, bad.field, str(bad)))
                report.count(str(path), ok=False)
                continue
            seen[record.call_id] = f"{path}:{line}"
            calls.append(record)
            report.count(str(path), ok=True)
    if report.rejected and on_error == "fail":
        raise IngestError(report)
    return calls, report
