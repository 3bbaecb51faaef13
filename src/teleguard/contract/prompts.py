"""Prompts for the three rounds (scene -> is_fraud -> fraud_type) in three modes, in Chinese and English.

The texts live in YAML files (`prompts/zh.yaml`, `prompts/en.yaml`); a user can load their own file with the
same shape instead, since a checkpoint works best with the exact prompt it was trained on. A user file may
leave sections out: they are taken from the built-in prompts of the file's language.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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


class Rationales(_Strict):
    scene: str
    fraud: str
    normal: str
    fraud_type: str
    evidence: str  # how reasoning quotes the caller ($evidence)


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

    def rationale(self, round_: Round | str, label: str | bool) -> str:
        """The reference reasoning for a round's label (warm-start targets, earlier rounds' answers)."""
        round_ = Round(round_)
        if round_ is Round.FRAUD:
            return self.rationales.fraud if label else self.rationales.normal
        template = self.rationales.scene if round_ is Round.SCENE else self.rationales.fraud_type
        return _fill(template, {"label": str(label)})

    def evidence(self, quote: str) -> str:
        """The sentence of reference reasoning that quotes the caller."""
        return _fill(self.rationales.evidence, {"evidence": quote})

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
