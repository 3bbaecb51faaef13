"""The task contract shared by training, evaluation and serving: labels, prompts and the one answer parser."""

from teleguard.contract.answers import answer_object, format_answer
from teleguard.contract.labels import (
    FRAUD,
    FRAUD_ANSWERS,
    FRAUD_TYPE_NAMES,
    FRAUD_TYPES,
    NORMAL,
    SCENE_NAMES,
    SCENES,
    STAGES,
    Label,
    Round,
    Stage,
    english_name,
    normalize_fraud_type,
    normalize_scene,
    round_of_answer,
)
from teleguard.contract.parser import ParsedOutput, estimate_think_length, parse_output
from teleguard.contract.prompts import Mode, PromptFileError, PromptSet, builtin_prompts, load_prompts

__all__ = [
    "FRAUD",
    "FRAUD_ANSWERS",
    "FRAUD_TYPES",
    "FRAUD_TYPE_NAMES",
    "NORMAL",
    "SCENES",
    "SCENE_NAMES",
    "STAGES",
    "Label",
    "Mode",
    "ParsedOutput",
    "PromptFileError",
    "PromptSet",
    "Round",
    "Stage",
    "answer_object",
    "builtin_prompts",
    "english_name",
    "estimate_think_length",
    "format_answer",
    "load_prompts",
    "normalize_fraud_type",
    "normalize_scene",
    "parse_output",
    "round_of_answer",
]
