"""Prompts for the three rounds (scene -> is_fraud -> fraud_type) in three modes, in Chinese and English.

The texts live in YAML files (`prompts/zh.yaml`, `prompts/en.yaml`); a user can load their own file with the
same shape instead, since a checkpoint works best with the exact prompt it was trained on. A user file may
leave sections out: they are taken from the built-in prompts of the file's language.

The `rationales` section holds the wording of the reference reasoning (warm-start SFT targets, the reference
answers of earlier rounds): templates that teleguard.data.evidence fills per call with the caller's quoted
words, what they do (`cues`), the pattern of the label (`patterns`) and the decision. They are checked when
loaded: every think template quotes the call (`$quote`), every fraud type and scene has a pattern, and the
quotation marks that delimit evidence (“ ” and ") appear only in the quote templates, so a quote can be read back
from a model's reasoning.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from teleguard.contract.labels import FRAUD_TYPE_NAMES, SCENE_NAMES, STAGES, Round
from teleguard.yaml_files import field_errors, read_mapping


class Mode(StrEnum):
    OFFLINE = "offline"  # a whole call, slow thinking in <think>
    REALTIME = "realtime"  # a call prefix: conversation_stage, null labels, "information insufficient"
    DIRECT = "direct"  # answer without thinking (baselines, fast paths)


Language = Literal["zh", "en"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallMaterial(_Strict):
    audio: str
    text: str


class PerRound(_Strict):
    scene: str
    is_fraud: str
    fraud_type: str

    def of(self, round_: Round) -> str:
        return getattr(self, round_.value)


class PerMode(_Strict):
    offline: str
    realtime: str
    direct: str

    def of(self, mode: Mode) -> str:
        return getattr(self, mode.value)


# The cues of teleguard.data.evidence: what a quoted utterance does. `mention` words a code/card/identity keyword
# said without a request or claim verb; `none` is for a fraud call whose visible part shows no cue.
CUE_NAMES: tuple[str, ...] = (
    "code", "card", "transfer", "download", "secrecy", "identity", "offer", "anomaly",
)  # fmt: skip
QUOTE_MARKS = '“”"'  # delimit quoted evidence in a reasoning text: nowhere else in the templates
_THINKS = ("scene", "fraud", "normal", "fraud_type", "insufficient")


class Cues(_Strict):
    """What a quoted utterance does, per cue ($word: the keyword it matched)."""

    code: str
    card: str
    transfer: str
    download: str
    secrecy: str
    identity: str
    offer: str
    anomaly: str
    mention: str
    none: str

    def of(self, cue: str, word: str, *, strong: bool = True) -> str:
        return _fill(getattr(self, cue) if strong else self.mention, {"word": word})


class PerStage(_Strict):
    early_stage: str
    late_stage: str
    complete: str

    def of(self, stage: str) -> str:
        return getattr(self, str(stage))


class Reasons(_Strict):
    """The answer's short "reason" per round and label (same placeholders as the think templates)."""

    scene: str
    fraud: str
    normal: str
    fraud_type: str


def _has(text: str, field: str, *names: str) -> str:
    for name in names:
        if f"${name}" not in text and f"${{{name}}}" not in text:
            raise ValueError(f"'{field}' must contain ${name}, got {text!r}")
    return text


def _unquoted(text: str, field: str) -> str:
    if any(mark in text for mark in QUOTE_MARKS):
        raise ValueError(
            f"'{field}' contains a quotation mark ({QUOTE_MARKS}): these delimit quoted evidence and belong only "
            f"in the quote templates (evidence, evidence_callee, also, reply), got {text!r}"
        )
    return text


class Rationales(_Strict):
    """Per-call reference reasoning (teleguard.data.evidence fills these).

    Think templates (`scene`, `fraud`, `normal`, `fraud_type`, `insufficient`) take `$stage` (the real-time
    stage lead, empty offline), `$quote` (the quoted evidence, built from the quote templates), `$cue` (what
    the quoted words do), `$pattern` (the label's pattern) and `$label`. Quote templates take `$evidence`.
    """

    scene: str
    fraud: str
    normal: str
    fraud_type: str
    insufficient: str  # an early prefix with no salient evidence: null label, "information insufficient"
    reasons: Reasons
    evidence: str  # how reasoning quotes the caller ($evidence)
    evidence_callee: str  # the other speaker ($evidence)
    also: str  # a second quote ($evidence), when two calls would otherwise share a rationale
    reply: str  # the other speaker's reply ($evidence), likewise
    turn: str  # the quote's turn number ($turn), likewise
    separator: str  # between the parts of $quote
    cue_join: str  # between two cues
    stages: PerStage
    cues: Cues
    patterns: dict[str, str]  # every fraud type and scene, plus "fraud" and "normal" (a call without one)

    @field_validator(*_THINKS)
    @classmethod
    def _quotes_the_call(cls, text: str, info: Any) -> str:
        _has(text, info.field_name, "quote")
        if info.field_name in ("scene", "fraud_type"):
            _has(text, info.field_name, "label")  # the think ends with the decision
        return _unquoted(text, info.field_name)

    @field_validator("evidence", "evidence_callee", "also", "reply")
    @classmethod
    def _quote_template(cls, text: str, info: Any) -> str:
        return _has(text, info.field_name, "evidence")

    @field_validator("turn")
    @classmethod
    def _turn_template(cls, text: str) -> str:
        return _unquoted(_has(text, "turn", "turn"), "turn")

    @field_validator("separator", "cue_join")
    @classmethod
    def _plain(cls, text: str, info: Any) -> str:
        return _unquoted(text, info.field_name)

    @field_validator("patterns")
    @classmethod
    def _every_label(cls, patterns: dict[str, str]) -> dict[str, str]:
        wanted = (*FRAUD_TYPE_NAMES, *SCENE_NAMES, "fraud", "normal")
        missing = [name for name in wanted if name not in patterns]
        unknown = [name for name in patterns if name not in wanted]
        if missing or unknown:
            raise ValueError(
                "patterns need one text per fraud type and scene plus 'fraud' and 'normal'"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        for name, text in patterns.items():
            _unquoted(text, f"patterns.{name}")
        return patterns

    @model_validator(mode="after")
    def _plain_parts(self) -> Rationales:
        for group in ("reasons", "stages", "cues"):
            for name, text in getattr(self, group):
                _unquoted(text, f"{group}.{name}")
        return self

    def pattern(self, label: str) -> str:
        return self.patterns[label]


class PromptSet(_Strict):
    """All prompt texts of one language."""

    language: Language
    system: str
    call: CallMaterial
    questions: PerRound
    follow_up: str
    answer_keys: PerRound
    answer_keys_nullable: PerRound
    insufficient: str
    modes: PerMode
    rationales: Rationales

    def think_template(self, round_: Round | str, label: str | bool | None) -> str:
        """The think template of a round's label; None: the "information insufficient" one."""
        round_ = Round(round_)
        if label is None:
            return self.rationales.insufficient
        if round_ is Round.FRAUD:
            return self.rationales.fraud if label else self.rationales.normal
        return self.rationales.scene if round_ is Round.SCENE else self.rationales.fraud_type

    def reason_template(self, round_: Round | str, label: str | bool) -> str:
        round_ = Round(round_)
        if round_ is Round.FRAUD:
            return self.rationales.reasons.fraud if label else self.rationales.reasons.normal
        return self.rationales.reasons.scene if round_ is Round.SCENE else self.rationales.reasons.fraud_type

    def evidence(self, quote: str, *, callee: bool = False) -> str:
        """The words of reference reasoning that quote the caller (or, `callee`, the other speaker)."""
        template = self.rationales.evidence_callee if callee else self.rationales.evidence
        return _fill(template, {"evidence": quote})

    def user_prompt(
        self,
        round_: Round | str,
        mode: Mode | str = Mode.OFFLINE,
        *,
        transcript: str | None = None,
        audio: bool = False,
        with_call: bool = True,
    ) -> str:
        """The user message that asks one round's question.

        `with_call` puts the call itself (the `<audio>` tag, or the transcript) before the question: true for
        the first round of a conversation, false for the rounds that follow it.
        """
        round_, mode = Round(round_), Mode(mode)
        keys = self.answer_keys_nullable if mode is Mode.REALTIME else self.answer_keys
        fields = {
            "scenes": "、".join(SCENE_NAMES) if self.language == "zh" else ", ".join(SCENE_NAMES),
            "fraud_types": "、".join(FRAUD_TYPE_NAMES)
            if self.language == "zh"
            else ", ".join(FRAUD_TYPE_NAMES),
            "stages": " / ".join(STAGES),
            "insufficient": self.insufficient,
            "answer_key": keys.of(round_),
            "transcript": transcript or "",
        }
        parts = []
        question = _fill(self.questions.of(round_), fields)
        if with_call:
            if audio:
                parts.append(self.call.audio)
            elif transcript is not None:
                parts.append(_fill(self.call.text, fields))
            else:
                raise ValueError("the first round needs the call: pass transcript=... or audio=True")
        else:
            question = self.follow_up + question
        parts.append(question)
        parts.append(_fill(self.modes.of(mode), fields))
        return "\n".join(part.strip("\n") for part in parts)


def fill(template: str, fields: dict[str, str]) -> str:
    """A template with its $fields filled; unknown $words stay as they are."""
    return _fill(template, fields)


def _fill(template: str, fields: dict[str, str]) -> str:
    # safe_substitute leaves unknown $words alone: user prompts may contain '$' in prose.
    return Template(template).safe_substitute(fields)


class PromptFileError(ValueError):
    """A prompt file that cannot be used, with the file and the field that is wrong."""


@cache
def _builtin_raw(language: str) -> dict[str, Any]:
    text = resources.files("teleguard.contract").joinpath("prompts", f"{language}.yaml").read_text("utf-8")
    return yaml.safe_load(text)


@cache
def builtin_prompts(language: Language = "zh") -> PromptSet:
    """teleguard's own prompts in one language."""
    if language not in ("zh", "en"):
        raise ValueError(f"no built-in prompts for language {language!r} (have: zh, en)")
    return PromptSet.model_validate(_builtin_raw(language))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


def load_prompts(source: str | Path | None = None) -> PromptSet:
    """Prompts from a YAML file, or the built-in set when `source` is None, "zh" or "en"."""
    if source is None or str(source) in ("zh", "en"):
        return builtin_prompts(str(source or "zh"))  # type: ignore[arg-type]
    path = Path(source)
    raw = read_mapping(path, "prompt file", PromptFileError)
    language = raw.get("language", "zh")
    if language not in ("zh", "en"):
        raise PromptFileError(f"{path}: field 'language' must be 'zh' or 'en', got {language!r}")
    try:
        return PromptSet.model_validate(_merge(_builtin_raw(language), raw))
    except ValidationError as err:
        problems = "; ".join(field_errors(err))
        raise PromptFileError(f"{path}: {problems}") from err


def write_prompt_set(path: Path, prompts: PromptSet) -> Path:
    """Every text of a prompt set as a prompt file (`load_prompts` reads it back to an equal set)."""
    path.write_text(
        yaml.safe_dump(prompts.model_dump(mode="json"), allow_unicode=True, sort_keys=False, width=1000),
        "utf-8",
    )
    return path
