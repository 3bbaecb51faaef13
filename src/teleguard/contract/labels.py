"""The label sets of the task.

Chinese names are canonical: they are what TeleAntiFraud data and the SAFE-QAQ models use. Every label also
has an English name and accepted aliases so that users, reports and English-prompted models can speak either
language; `normalize_*` maps any accepted spelling to the canonical name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Label:
    """A canonical label with its English name and other accepted spellings."""

    name: str
    english: str
    aliases: tuple[str, ...] = ()

    def spellings(self) -> tuple[str, ...]:
        return (self.name, self.english, *self.aliases)


SCENES: tuple[Label, ...] = (
    Label("订餐服务", "food ordering", ("restaurant booking", "meal ordering", "food_ordering")),
    Label("咨询客服", "customer service inquiry", ("customer service", "customer_service_inquiry")),
    Label("预约服务", "appointment", ("appointment booking", "reservation")),
    Label(
        "交通咨询", "transport inquiry", ("transportation inquiry", "transport_inquiry", "traffic inquiry")
    ),
    Label("日常购物", "shopping", ("daily shopping", "online shopping")),
    Label("打车服务", "ride hailing", ("ride-hailing", "taxi", "ride_hailing")),
    Label("外卖服务", "food delivery", ("takeaway", "takeout", "food_delivery")),
)

FRAUD_TYPES: tuple[Label, ...] = (
    Label("投资诈骗", "investment fraud", ("investment scam", "investment")),
    Label("钓鱼诈骗", "phishing", ("phishing fraud", "phishing scam")),
    Label("身份盗窃", "identity theft", ("identity fraud",)),
    Label("彩票诈骗", "lottery fraud", ("lottery scam", "lottery", "prize fraud")),
    Label("银行诈骗", "bank fraud", ("bank scam", "banking fraud")),
    Label("绑架诈骗", "kidnapping fraud", ("kidnapping scam", "virtual kidnapping", "kidnapping")),
    Label("客服诈骗", "fake customer service", ("customer service fraud", "customer service scam")),
    Label("邮件诈骗", "email/parcel fraud", ("email fraud", "parcel fraud", "package fraud", "mail fraud")),
)

# The is_fraud round's gold answers, as the SAFE-QAQ data writes them.
FRAUD = "fraud"
NORMAL = "normal"
FRAUD_ANSWERS: tuple[str, str] = (FRAUD, NORMAL)


class Stage(StrEnum):
    """Conversation stage of a (partial) call, as the real-time prompts and the stage reward use it."""

    EARLY = "early_stage"  # the caller's intent is not shown yet: a null label is acceptable
    LATE = "late_stage"  # the call is near its end: a label should be given
    COMPLETE = "complete"  # the whole call: the label must not be null


STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
SCENE_NAMES: tuple[str, ...] = tuple(label.name for label in SCENES)
FRAUD_TYPE_NAMES: tuple[str, ...] = tuple(label.name for label in FRAUD_TYPES)


class Round(StrEnum):
    """The three rounds of one conversation about a call, in the order they are asked."""

    SCENE = "scene"
    FRAUD = "is_fraud"
    FRAUD_TYPE = "fraud_type"


def _lookup(labels: tuple[Label, ...]) -> dict[str, str]:
    table: dict[str, str] = {}
    for label in labels:
        for spelling in label.spellings():
            table[_key(spelling)] = label.name
    return table


def _key(text: str) -> str:
    return " ".join(text.strip().lower().replace("_", " ").replace("-", " ").split())


_SCENE_LOOKUP = _lookup(SCENES)
_FRAUD_TYPE_LOOKUP = _lookup(FRAUD_TYPES)
_ENGLISH = {label.name: label.english for label in (*SCENES, *FRAUD_TYPES)}


def normalize_scene(text: str) -> str | None:
    """The canonical scene for any accepted spelling, or None if it is not a scene."""
    return _SCENE_LOOKUP.get(_key(text))


def normalize_fraud_type(text: str) -> str | None:
    """The canonical fraud type for any accepted spelling, or None if it is not a fraud type."""
    return _FRAUD_TYPE_LOOKUP.get(_key(text))


def english_name(canonical: str) -> str:
    """English name of a canonical scene or fraud type (the input itself when it has none)."""
    return _ENGLISH.get(canonical, canonical)


def round_of_answer(answer: str) -> Round | None:
    """Which round a gold answer belongs to: a scene name, fraud/normal, or a fraud-type name."""
    if answer in SCENE_NAMES:
        return Round.SCENE
    if answer in FRAUD_ANSWERS:
        return Round.FRAUD
    if answer in FRAUD_TYPE_NAMES:
        return Round.FRAUD_TYPE
    return None


def allowed_labels(round_: Round) -> tuple[str, ...] | tuple[bool, ...]:
    """The closed label set a model must choose from in a round (null aside)."""
    if round_ is Round.SCENE:
        return SCENE_NAMES
    if round_ is Round.FRAUD_TYPE:
        return FRAUD_TYPE_NAMES
    return (True, False)
