"""Named evaluation sets: seeded transformations of the held-out calls that probe what a detector relies on.

The held-out split says how well a detector does on calls like its training calls. These sets ask harder,
narrower questions (docs/eval-sets.md):

- `gold`: a clean, balanced reference: equal fraud and normal calls, spread evenly over fraud types and scenes;
- `disguised_opening`: fraud calls that open like a real service call (does it judge the whole call?);
- `fraud_words_in_normal`: normal calls with fraud vocabulary in benign sentences (does it just spot words?);
- `code_switching`: key Chinese words swapped for English ones (does it survive mixed-language speech?);
- `very_short`: the first two turns of a call (how much does it guess from the greeting alone?).

Every set is a plain function `(calls, seed, limit) -> list[CallRecord]`: it draws only calls whose labels are
complete and consistent (see `eligible_calls`), is deterministic for a seed whatever the input order, never
returns more than `limit` calls, and gives each call the id `<original id>#<tag>` so ids are unique in a set and
never collide with the split's own. Transformed turns lose their times (they no longer match any audio) and
are re-timed from the speech rate when the set is built; sets that keep the call's audio valid are listed in
`AUDIO_SETS`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from teleguard.data.records import CallRecord, Turn

EVAL_SETS_DIR = "eval_sets"  # <datasets>/eval_sets/<name>/grpo.jsonl
DEFAULT_SIZE = 64  # calls per set
DEFAULT_SEED = 0

# Normal-call scenes whose openings sound like a company calling a customer: the disguise of a fraud call.
SERVICE_SCENES: tuple[str, ...] = ("咨询客服", "外卖服务", "订餐服务", "预约服务")

# Benign sentences a real service agent might say, each holding one word that fraud calls are full of.
BENIGN_SENTENCES: tuple[tuple[str, str], ...] = (
    ("验证码", "温馨提示，我们的工作人员不会向您索要验证码，请不要告诉任何人。"),
    ("转账", "费用直接在平台上支付就可以，不需要给任何个人转账。"),
    ("安全账户", "最近有人冒充客服让人把钱转到所谓的安全账户，您千万别信，我们从来不会这样做。"),
    ("冻结", "您的会员积分不会被冻结，有效期内都可以正常使用。"),
    ("公安局", "我们门店就在公安局斜对面，您过来很好找。"),
    ("银行卡", "如果需要退款，钱会原路退回您付款的银行卡，三个工作日内到账。"),
    ("中奖", "抽奖活动的中奖名单会在官方App上公布，我们不会打电话让您交任何费用。"),
    ("刷单", "提醒您一下，网上那些刷单返利都是骗局，我们平台没有这类活动。"),
)
FRAUD_WORDS: tuple[str, ...] = tuple(word for word, _ in BENIGN_SENTENCES)

# Chinese -> English, as bilingual callers mix them. Longer keys win where keys overlap (银行卡 before 银行).
CODE_SWITCH: dict[str, str] = {
    "银行卡": "bank card",
    "银行": "bank",
    "信用卡": "credit card",
    "账户": "account",
    "账号": "account number",
    "验证码": "verification code",
    "密码": "password",
    "客服": "customer service",
    "快递": "express delivery",
    "包裹": "package",
    "退款": "refund",
    "订单": "order",
    "转账": "transfer",
    "手机": "phone",
    "链接": "link",
    "优惠券": "coupon",
    "投资": "investment",
    "贷款": "loan",
    "会员": "VIP member",
    "外卖": "takeout",
}
_SWITCH = re.compile("|".join(sorted(map(re.escape, CODE_SWITCH), key=len, reverse=True)))
_GLUE = re.compile(r"(?<=[A-Za-z0-9])\0+(?=[A-Za-z0-9])")  # replacement edges between two ASCII words

SHORT_TURNS = 2  # turns kept by `very_short`
SHORT_MIN_TURNS = 4  # calls it cuts: at least half of each call is gone


class EvalSetFn(Protocol):
    def __call__(
        self, calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
    ) -> list[CallRecord]: ...


# --------------------------------------------------------------------------------------------- selection


def labels_complete(call: CallRecord) -> bool:
    """A fraud call names its fraud type, a normal call its scene, and there is a conversation to judge."""
    labels = call.labels
    named = labels.fraud_type is not None if labels.is_fraud else labels.scene is not None
    return named and len(call.turns) >= 2


def eligible_calls(calls: Iterable[CallRecord]) -> list[CallRecord]:
    """Calls with complete labels, sorted by id; a transcript found under two different labels is dropped
    everywhere (its gold answer is in doubt), and a repeated transcript is kept once."""
    by_text: dict[str, list[CallRecord]] = defaultdict(list)
    for call in calls:
        if labels_complete(call):
            by_text[call.transcript()].append(call)
    kept = []
    for group in by_text.values():
        if len({c.labels for c in group}) == 1:
            kept.append(min(group, key=lambda c: c.call_id))
    return sorted(kept, key=lambda c: c.call_id)


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def _stratified(calls: Sequence[CallRecord], rng: random.Random, n: int) -> list[CallRecord]:
    """Up to n calls, round-robin over their labels (fraud type or scene), so every label is as even as the
    calls allow; which calls of a label is seeded."""
    groups: dict[str, list[CallRecord]] = defaultdict(list)
    for call in sorted(calls, key=lambda c: c.call_id):
        groups[call.labels.name].append(call)
    queues = []
    for label in sorted(groups):
        group = groups[label]
        rng.shuffle(group)
        queues.append(group)
    picked: list[CallRecord] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def _balanced(calls: Sequence[CallRecord], rng: random.Random, limit: int) -> list[CallRecord]:
    """Equally many fraud and normal calls (limit // 2 each at most), alternating, each class stratified."""
    fraud = [c for c in calls if c.labels.is_fraud]
    normal = [c for c in calls if not c.labels.is_fraud]
    n = min(limit // 2, len(fraud), len(normal))
    pairs = zip(_stratified(fraud, rng, n), _stratified(normal, rng, n), strict=True)
    return [call for pair in pairs for call in pair]


def _tagged(call: CallRecord, tag: str, turns: Sequence[Turn] | None = None, **meta: Any) -> CallRecord:
    """The call as a member of a set: id suffixed, provenance in meta; new turns drop times and audio."""
    update: dict[str, Any] = {
        "call_id": f"{call.call_id}#{tag}",
        "meta": {**call.meta, "eval_set": tag, "original_id": call.call_id, **meta},
    }
    if turns is not None:
        update["turns"] = tuple(Turn(speaker=t.speaker, text=t.text) for t in turns)
        update["audio"] = None
        update["meta"] = {k: v for k, v in update["meta"].items() if k not in ("times", "audio_seconds")}
    return call.model_copy(update=update)


# ------------------------------------------------------------------------------------------------- sets


def gold(
    calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
) -> list[CallRecord]:
    """A clean reference set: calls unchanged, equally many fraud and normal (limit // 2 each at most), fraud
    calls spread evenly over fraud types and normal calls over scenes, only calls with complete and consistent
    labels. Its numbers are not skewed by the split's class balance: the baseline to read the red-team sets
    against."""
    return [_tagged(c, "gold") for c in _balanced(eligible_calls(calls), _rng(seed, "gold"), limit)]


def disguised_opening(
    calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
) -> list[CallRecord]:
    """Fraud calls that open like a normal service call: the opening exchange of a real normal call of a
    service scene (`SERVICE_SCENES`, drawn from the same calls) is put before the fraud call: the agent's
    greeting and the customer's reply (2 turns), or only the greeting when the fraud call opens with the
    callee (1 turn), so speakers still alternate. Label kept (fraud, same fraud type); fraud calls are
    stratified by fraud type. Hard because the first impression is a legitimate call: a detector that judges
    the opening, not the whole call, misses these. No service-scene normal call, no set."""
    pool = eligible_calls(calls)
    openers = [
        c
        for c in pool
        if not c.labels.is_fraud
        and c.labels.scene in SERVICE_SCENES
        and (c.turns[0].speaker, c.turns[1].speaker) == ("left", "right")
    ]
    if not openers:
        return []
    rng = _rng(seed, "disguised_opening")
    out = []
    for call in _stratified([c for c in pool if c.labels.is_fraud], rng, limit):
        opener = rng.choice(openers)
        opening = opener.turns[:2] if call.turns[0].speaker == "left" else opener.turns[:1]
        out.append(
            _tagged(
                call,
                "rt-opening",
                [*opening, *call.turns],
                opening_from=opener.call_id,
                opening_turns=len(opening),
            )
        )
    return out


def fraud_words_in_normal(
    calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
) -> list[CallRecord]:
    """Normal calls salted with fraud vocabulary used innocently: two distinct seeded `BENIGN_SENTENCES`
    (anti-fraud reminders, directions, refund notes holding 验证码, 转账, 安全账户, 冻结, 公安局, ...) are
    appended to caller ("left") turns: the first to the caller's first turn (so a prompt cut by
    `max_transcript_chars` still shows it), the second to a seeded caller turn. Label kept (normal, same
    scene); calls stratified by scene. Hard because a detector that keys on words rather than intent raises
    false alarms on them."""
    rng = _rng(seed, "fraud_words_in_normal")
    normal = [c for c in eligible_calls(calls) if not c.labels.is_fraud]
    normal = [c for c in normal if any(t.speaker == "left" for t in c.turns)]
    out = []
    for call in _stratified(normal, rng, limit):
        turns = list(call.turns)
        caller = [i for i, t in enumerate(turns) if t.speaker == "left"]
        salt = rng.sample(BENIGN_SENTENCES, 2)
        for i, (_, sentence) in zip((caller[0], rng.choice(caller)), salt, strict=True):
            turns[i] = Turn(speaker="left", text=f"{turns[i].text}{sentence}")
        out.append(_tagged(call, "rt-words", turns, salted_words=[word for word, _ in salt]))
    return out


def code_switch_text(text: str) -> str:
    """Every `CODE_SWITCH` word in the text replaced by its English, longest words first.

    One pass leaves none: the pieces left between matches are joined only through English. A space goes
    between an English word and a letter or digit beside it ("bank customer service", not "bankcustomer").
    """
    pieces, last = [], 0
    for match in _SWITCH.finditer(text):
        pieces += [text[last : match.start()], f"\0{CODE_SWITCH[match.group()]}\0"]
        last = match.end()
    pieces.append(text[last:])
    return _GLUE.sub(" ", "".join(pieces)).replace("\0", "")


def code_switching(
    calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
) -> list[CallRecord]:
    """Calls in mixed Chinese and English: every `CODE_SWITCH` word (银行→bank, 账户→account, 验证码→
    verification code, 客服→customer service, 快递→express delivery, 退款→refund, ...) in every turn is
    replaced by its English, as bilingual callers speak. Only calls holding at least one such word; labels kept;
    balanced fraud/normal and stratified as in `gold`. Hard because the telling words are the ones replaced,
    in a language a Chinese-trained detector saw little of."""
    pool = [c for c in eligible_calls(calls) if _SWITCH.search(c.transcript())]
    out = []
    for call in _balanced(pool, _rng(seed, "code_switching"), limit):
        switched = sorted({m.group() for t in call.turns for m in _SWITCH.finditer(t.text)})
        turns = [Turn(speaker=t.speaker, text=code_switch_text(t.text)) for t in call.turns]
        out.append(_tagged(call, "rt-code", turns, switched_words=switched))
    return out


def very_short(
    calls: Sequence[CallRecord], seed: int = DEFAULT_SEED, limit: int = DEFAULT_SIZE
) -> list[CallRecord]:
    """Calls cut to their first `SHORT_TURNS` (2) turns, taken from calls of at least `SHORT_MIN_TURNS` (4)
    turns. The label is the whole call's (a fraud call is fraud even if its first two turns only greet):
    the set measures how much a detector can tell, or guesses, from an opening alone. Balanced and stratified
    as in `gold`. Turn times and audio are kept: the cut call is the first seconds of the same audio."""
    pool = [c for c in eligible_calls(calls) if len(c.turns) >= SHORT_MIN_TURNS]
    return [
        _tagged(c, "rt-short", whole_turns=len(c.turns)).model_copy(update={"turns": c.turns[:SHORT_TURNS]})
        for c in _balanced(pool, _rng(seed, "very_short"), limit)
    ]


EVAL_SETS: dict[str, EvalSetFn] = {
    "gold": gold,
    "disguised_opening": disguised_opening,
    "fraud_words_in_normal": fraud_words_in_normal,
    "code_switching": code_switching,
    "very_short": very_short,
}

# Sets whose calls still match their audio (unchanged, or cut at a turn end): the only ones an audio dataset
# can hold without synthesizing new audio.
AUDIO_SETS: frozenset[str] = frozenset({"gold", "very_short"})


def check_names(names: Iterable[str] | None) -> list[str]:
    """The set names asked for, in registry order (None: all); unknown names are an error."""
    if names is None:
        return list(EVAL_SETS)
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in EVAL_SETS]
    if unknown:
        raise ValueError(
            f"unknown evaluation set(s) {', '.join(unknown)}; choose from {', '.join(EVAL_SETS)}"
        )
    return [n for n in EVAL_SETS if n in wanted]


def make_eval_sets(
    calls: Sequence[CallRecord],
    names: Iterable[str] | None = None,
    *,
    seed: int = DEFAULT_SEED,
    limit: int = DEFAULT_SIZE,
) -> dict[str, list[CallRecord]]:
    """The named sets (None: all) drawn from the same calls."""
    return {name: EVAL_SETS[name](calls, seed, limit) for name in check_names(names)}
