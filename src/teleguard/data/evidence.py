"""Per-call reasoning: the call's decisive utterances, chosen by salience, quoted in a rationale about the call.

Reference targets (warm-start SFT, the reference answers of earlier rounds, evaluation sets) reason from the call
itself: they quote what was said, say what it does, name the pattern that makes it this label rather than
another, and end with the decision. The wording lives in the prompt file (`rationales`, see
teleguard.contract.prompts); this module picks the words to quote and fills the templates.

**Clauses.** Each turn's text (only the part the prompt shows, when the transcript is cut to
`max_transcript_chars`) is cut at clause punctuation (，。！？；： and their ASCII forms, …, quotation marks);
a clause shorter than `MIN_CLAUSE` characters is joined to the next one ("您好，这里是..."). A quote is one clause, or
a window of at most `quote_chars` characters of a longer one around its first cue word: always an exact
substring of the call's transcript.

**Cues** (`CUES`): keyword tables, Chinese and English, matched as substrings (English words on word
boundaries, any case). A clause's score is the sum of the weights of the distinct cues it holds:

| cue | weight | what |
|---|---|---|
| code | 5 | verification codes, passwords, PINs |
| card | 4 | card, account and ID numbers, personal details |
| transfer | 4 | transfers, payments, fees, deposits, ransom |
| download | 4 | links, downloads, apps, screen sharing, QR codes |
| secrecy | 3 | secrecy, urgency, threats |
| offer | 3 | prizes, high returns, refunds, compensation |
| identity | 2 | claimed identities: bank, police, courier, customer service, relatives |
| anomaly | 2 | account anomalies, frozen funds, lost parcels, accidents |

`code`, `card` and `identity` read as a request or a claim only with one of their verbs in the clause
(提供 / 告诉 / 输入 ... ; 我是 / 这里是 / 来自 ...); otherwise the rationale says the word is mentioned.

**What is quoted**, per round and label (fraud rounds quote the caller, the `left` speaker; normal-call rounds
quote either speaker, the service request often being the callee's):

- is_fraud, fraud: the caller's clause with the highest cue score;
- fraud_type: the caller's clause with the most words of the gold type (`FRAUD_TYPE_WORDS`, 2 each, up to 3)
  plus its cue score;
- is_fraud, normal, and scene: the clause with the most words of the call's scene (`SCENE_WORDS`, 2 each, up
  to 3) plus a service request (`SERVICE_WORDS`, 2);

ties go to the earlier clause; a second clause is quoted with it when it adds evidence (a cue the first lacks,
words of the label). With no scoring clause the caller's first clause is quoted. Quotes appear in the call's
order. The rationale then says what the quoted words do (their two heaviest cues, worded by the prompt file's
`cues`), the label's pattern (`patterns`: what tells this fraud type from the others, the service of a scene)
and the decision.

**Salient evidence** (real-time rows): for is_fraud of a fraud call, the distinct cues of the caller's visible
clauses weigh together at least `SALIENT` (3: any request, payment, link, pressure or offer, or an identity with
an anomaly); for the type and scene rounds, a word of the label; for a normal call's is_fraud, a scene word or a
service request. An early-stage prefix without salient evidence gets the null "information insufficient"
target.

**No two calls share a rationale.** A `RationaleWriter` remembers every think it wrote (one writer per built
split). When a call's text is taken, it tries, in turn, what stays true to the call: the second quote, the
other speaker's reply, the quote's turn number; the next best clauses; clauses beyond the transcript window;
the quote with each other clause, and whole short turns. Only calls alike in all of that share a text
(`RationaleWriter.shared` counts them; none in the shared TeleAntiFraud data).

`reasoning_figures(pairs)` computes, for any (call transcript, answer text) pairs, targets or model outputs
alike, the distinct-reasoning rate and how often the quoted evidence occurs verbatim in the call.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from teleguard.contract import PromptSet, Round, Stage, parse_output
from teleguard.contract.prompts import CUE_NAMES, fill
from teleguard.data.records import CallRecord

DEFAULT_QUOTE_CHARS = 40  # a quote's longest; targets stay short for CPU training
MIN_CLAUSE = 6  # shorter clauses ("您好") are joined to the next one
SALIENT = 3.0
LABEL_WORD = 2.0  # score of each word of the label's type or scene in a clause
LABEL_WORDS_COUNTED = 3
SHORT_REPLY = 20  # the other speaker's reply is quoted up to this many characters

CALLER = "left"  # TeleAntiFraud puts the caller on the left channel

_CLAUSE_END = re.compile(r"[，,。！!？?；;：:…\n“”\"]|\.(?!\d)")
_AFTER_QUOTE = re.compile(r"\0[，,:：;；]?\s*")
_QUOTED = re.compile(r"“([^“”]+)”|\"([^\"]+)\"")


@dataclass(frozen=True)
class Cue:
    """A kind of decisive utterance: its keywords (Chinese and English) and how much it weighs."""

    name: str
    weight: float
    words: tuple[str, ...]
    # with one of these in the clause the cue reads as a request or a claim; none listed: always
    verbs: tuple[str, ...] = ()


_REQUEST = (
    "提供", "告诉", "告知", "报一下", "报给", "发给", "发送", "输入", "填写", "填一下", "念一下", "读一下",
    "说一下", "核对", "核实", "确认一下", "给我", "需要您", "请您", "麻烦您",
    "provide", "tell me", "send", "enter", "give me", "confirm", "read out",
)  # fmt: skip
_CLAIM = (
    "我是", "这里是", "这边是", "我们是", "来自", "我这边", "本人是", "i am", "i'm", "this is", "calling from",
)  # fmt: skip

CUES: tuple[Cue, ...] = (
    Cue("code", 5.0, (
        "验证码", "动态码", "校验码", "密码", "口令", "安全码", "CVV", "verification code", "password", "PIN",
        "OTP", "security code",
    ), _REQUEST),
    Cue("card", 4.0, (
        "银行卡号", "卡号", "身份证号", "身份证", "银行账户", "账户信息", "账号", "个人信息", "有效期", "信用卡",
        "身份验证", "验证身份", "核实身份", "详细信息", "相关信息", "card number", "account number", "ID number", "bank account", "personal information",
    ), _REQUEST),
    Cue("transfer", 4.0, (
        "转账", "汇款", "打款", "转到", "转入", "安全账户", "缴纳", "缴费", "交费", "手续费", "保证金", "税费",
        "押金", "赎金", "付款", "支付", "充值", "垫付", "transfer", "wire", "payment", "pay", "fee", "deposit",
        "ransom",
    )),
    Cue("download", 4.0, (
        "下载", "链接", "点击", "安装", "屏幕共享", "共享屏幕", "远程", "软件", "网址", "网站", "二维码", "扫码",
        "登录", "APP", "download", "link", "click", "install", "screen shar", "remote", "website", "QR code",
        "log in",
    )),
    Cue("secrecy", 3.0, (
        "保密", "不要告诉", "别告诉", "不要声张", "不要报警", "别报警", "立即", "立刻", "马上", "尽快", "赶紧",
        "否则", "逾期", "限时", "过期", "逮捕", "起诉", "通缉", "撕票", "后果", "secret", "don't tell",
        "immediately", "urgent", "right now", "otherwise", "arrest",
    )),
    Cue("identity", 2.0, (
        "银行", "公安", "警察", "警官", "派出所", "法院", "检察院", "快递", "速递", "物流", "邮局", "邮政", "客服",
        "工作人员", "专员", "经理", "彩票中心", "税务", "社保", "医保", "儿子", "女儿", "家人", "亲人", "bank",
        "police", "court", "courier", "customer service", "officer",
    ), _CLAIM),
    Cue("offer", 3.0, (
        "中奖", "奖金", "大奖", "一等奖", "抽中", "领奖", "高收益", "收益率", "收益", "回报", "稳赚", "返利", "翻倍",
        "理财", "退款", "理赔", "赔偿", "补偿", "补贴", "礼品", "prize", "reward", "high return", "refund",
        "compensation", "bonus",
    )),
    Cue("anomaly", 2.0, (
        "异常", "被盗", "盗刷", "冻结", "风险", "涉嫌", "违规", "违法", "洗钱", "出问题", "丢失", "滞留", "扣留",
        "被扣", "损坏", "出事", "车祸", "绑架", "受伤", "出了问题", "有问题", "遇到问题", "遇到了一些问题",
        "清关", "违禁品", "不明交易", "遇到了麻烦", "遇到了点麻烦", "出了点事", "出了事", "abnormal", "unusual", "suspicious", "frozen", "stolen",
        "lost", "accident",
    )),
)  # fmt: skip
assert tuple(c.name for c in CUES) == CUE_NAMES  # the prompt file words exactly these cues

# Words that mark a fraud type: they pick the fraud_type round's quote (the gold type's words).
FRAUD_TYPE_WORDS: dict[str, tuple[str, ...]] = {
    "投资诈骗": ("投资", "收益", "回报", "理财", "股票", "基金", "项目", "数字货币", "比特币", "稳赚", "年化",
             "分红", "investment", "return"),
    "钓鱼诈骗": ("链接", "点击", "网址", "网站", "登录", "下载", "短信", "邮件", "二维码", "扫码", "官网",
             "link", "click", "website", "log in"),
    "身份盗窃": ("身份证", "身份信息", "个人信息", "核实身份", "身份验证", "社保", "医保", "户籍", "实名",
             "登记", "姓名", "identity", "ID number"),
    "彩票诈骗": ("中奖", "彩票", "奖金", "大奖", "一等奖", "抽奖", "领奖", "抽中", "幸运", "奖品", "lottery",
             "prize"),
    "银行诈骗": ("银行", "账户", "银行卡", "信用卡", "额度", "冻结", "异常", "盗刷", "安全账户", "贷款", "bank",
             "account"),
    "绑架诈骗": ("绑架", "绑匪", "儿子", "女儿", "孩子", "家人", "亲人", "赎金", "撕票", "手上", "报警", "出事",
             "kidnap", "ransom"),
    "客服诈骗": ("客服", "退款", "订单", "售后", "理赔", "赔偿", "会员", "商品", "退货", "淘宝", "京东",
             "customer service", "refund", "order"),
    "邮件诈骗": ("快递", "包裹", "邮件", "速递", "物流", "邮局", "邮政", "海关", "派送", "签收", "运单",
             "违禁", "parcel", "package", "courier"),
}  # fmt: skip

# Words of each scene's service request (a normal call's is_fraud and scene rounds).
SCENE_WORDS: dict[str, tuple[str, ...]] = {
    "订餐服务": ("订餐", "预订", "订位", "订个", "包间", "餐厅", "位子", "桌", "用餐", "点餐", "菜", "book a table"),
    "咨询客服": ("客服", "咨询", "售后", "会员", "套餐", "退换", "保修", "使用", "customer service"),
    "预约服务": ("预约", "上门", "挂号", "安排", "时间", "appointment"),
    "交通咨询": ("交通", "地铁", "公交", "路线", "机场", "高铁", "火车", "航班", "车次", "站", "出行", "route"),
    "日常购物": ("购买", "买", "商品", "价格", "库存", "尺码", "款", "优惠", "店", "buy", "price"),
    "打车服务": ("打车", "叫车", "司机", "上车", "车牌", "目的地", "接您", "用车", "taxi", "ride"),
    "外卖服务": ("外卖", "配送", "送达", "骑手", "送餐", "订单", "餐", "delivery", "takeaway"),
}  # fmt: skip
SERVICE_WORDS: tuple[str, ...] = (
    "我想", "想了解", "想咨询", "想问", "想预约", "想订", "帮我", "请问", "为您服务", "有什么可以帮", "需要",
    "I'd like", "I want", "could you", "can I",
)  # fmt: skip


def _matcher(words: Iterable[str]) -> re.Pattern[str]:
    """One regex for a word list: longest first; ASCII words on word boundaries, any case."""
    parts = []
    for word in sorted(set(words), key=len, reverse=True):
        escaped = re.escape(word)
        parts.append(rf"(?<![A-Za-z]){escaped}(?![A-Za-z])" if word.isascii() else escaped)
    return re.compile("|".join(parts), re.IGNORECASE)


_CUE_RE = {c.name: _matcher(c.words) for c in CUES}
_VERB_RE = {c.name: _matcher(c.verbs) for c in CUES if c.verbs}
_TYPE_RE = {name: _matcher(words) for name, words in FRAUD_TYPE_WORDS.items()}
_SCENE_RE = {name: _matcher(words) for name, words in SCENE_WORDS.items()}
_SERVICE_RE = _matcher(SERVICE_WORDS)
_ANY_CUE = _matcher(w for c in CUES for w in c.words)
_BY_WEIGHT = sorted(CUES, key=lambda c: -c.weight)


# ------------------------------------------------------------------------------------------------ clauses


@dataclass(frozen=True)
class Clause:
    """A clause of one turn: `text` is `turns[turn].text[start:start + len(text)]`."""

    turn: int
    speaker: str
    start: int
    text: str


def visible_lengths(call: CallRecord, visible_chars: int | None) -> list[int]:
    """How many characters of each turn's text the prompt shows when the transcript is cut to `visible_chars`
    (CallRecord.transcript: one "左：" / "右：" line per turn)."""
    if visible_chars is None:
        return [len(t.text) for t in call.turns]
    shown, offset = [], 0
    for turn in call.turns:
        begin = offset + 2  # the speaker mark and "："
        shown.append(max(0, min(len(turn.text), visible_chars - begin)))
        offset = begin + len(turn.text) + 1  # and the newline
    return shown


def split_clauses(call: CallRecord, visible_chars: int | None = None) -> list[Clause]:
    """The call's clauses in order, within the part of each turn the prompt shows."""
    return list(_clauses(_shown(call, visible_chars)))


def _shown(call: CallRecord, visible_chars: int | None) -> tuple[tuple[str, str], ...]:
    """(speaker, the text the prompt shows) per turn."""
    lengths = visible_lengths(call, visible_chars)
    return tuple((t.speaker, t.text[:n]) for t, n in zip(call.turns, lengths, strict=True))


@lru_cache(maxsize=1 << 12)
def _clauses(turns: tuple[tuple[str, str], ...]) -> tuple[Clause, ...]:
    clauses = []
    for i, (speaker, text) in enumerate(turns):
        pieces, start = [], 0
        for end in [m.start() for m in _CLAUSE_END.finditer(text)] + [len(text)]:
            if end > start:
                pieces.append((start, end))
            start = end + 1
        merged: list[tuple[int, int]] = []
        for begin, end in pieces:
            # a short clause ("您好") joins the next one; the text between them stays, so it is still a substring
            if merged and merged[-1][1] - merged[-1][0] < MIN_CLAUSE:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((begin, end))
        for begin, end in merged:
            piece = text[begin:end]
            stripped = piece.strip()
            if stripped and not any(mark in stripped for mark in '“”"'):
                lead = piece.index(stripped[0])
                clauses.append(Clause(i, speaker, begin + lead, stripped))
    return tuple(clauses)


# ---------------------------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class CueHit:
    cue: str
    word: str
    strong: bool  # a request or claim verb is there (or the cue needs none)


@dataclass(frozen=True)
class Hit:
    """A scored clause and the quote taken from it."""

    clause: Clause
    score: float
    cues: tuple[CueHit, ...]  # the fraud cues it holds, heaviest first
    label_words: int  # words of the label's type or scene
    quote: str


@lru_cache(maxsize=1 << 16)  # clauses repeat across a call's prefixes and rounds
def cue_hits(text: str) -> tuple[CueHit, ...]:
    """The fraud cues a text holds, heaviest first."""
    if not _ANY_CUE.search(text):
        return ()
    hits = []
    for cue in _BY_WEIGHT:
        match = _CUE_RE[cue.name].search(text)
        if match:
            verbs = _VERB_RE.get(cue.name)
            hits.append(CueHit(cue.name, match.group(0), verbs is None or bool(verbs.search(text))))
    return tuple(hits)


_WEIGHT = {c.name: c.weight for c in CUES}


def _label_re(round_: Round, label: Any, scene: str | None) -> re.Pattern[str] | None:
    if round_ is Round.FRAUD_TYPE:
        return _TYPE_RE.get(str(label))
    if round_ is Round.SCENE:
        return _SCENE_RE.get(str(label))
    if round_ is Round.FRAUD and label is False and scene is not None:
        return _SCENE_RE.get(scene)
    return None


def _quote(clause: Clause, anchor: int, quote_chars: int) -> str:
    text = clause.text
    if len(text) <= quote_chars:
        return text
    start = min(max(0, anchor - quote_chars // 4), len(text) - quote_chars)
    return text[start : start + quote_chars].strip() or text[:quote_chars]


@lru_cache(maxsize=1 << 16)  # a clause is scored once per round, whichever prefixes show it
def score_clause(clause: Clause, round_: Round, label: Any, scene: str | None, quote_chars: int) -> Hit:
    """How decisive a clause is for a round's label, and the quote it gives (cues are read from the quote, so
    what the rationale says about it holds for the quoted words)."""
    text = clause.text
    label_re = _label_re(round_, label, scene)
    service = None if _fraud_side(round_, label) else _SERVICE_RE.search(text)
    first_cue = _ANY_CUE.search(text)
    anchors = [m.start() for m in (first_cue, (label_re.search(text) if label_re else None), service) if m]
    quote = _quote(clause, min(anchors, default=0), quote_chars)
    cues = cue_hits(quote)
    words = len(set(label_re.findall(quote))) if label_re else 0
    score = LABEL_WORD * min(words, LABEL_WORDS_COUNTED)
    if _fraud_side(round_, label):
        score += sum(_WEIGHT[c.cue] for c in cues)
    elif service and service.group(0) in quote:  # a normal call: the service asked for
        score += LABEL_WORD
    return Hit(clause, score, cues, words, quote)


def _fraud_side(round_: Round, label: Any) -> bool:
    return round_ is Round.FRAUD_TYPE or (round_ is Round.FRAUD and label is True)


@dataclass(frozen=True)
class Evidence:
    """A call's clauses ranked for one round (scoring ones only, the best first), and whether it is salient."""

    hits: tuple[Hit, ...]
    fallback: Hit  # quoted when nothing scores: the caller's first clause
    salient: bool
    clauses: tuple[Clause, ...]


def find_evidence(
    call: CallRecord,
    round_: Round | str,
    label: Any,
    *,
    visible_chars: int | None = None,
    quote_chars: int = DEFAULT_QUOTE_CHARS,
) -> Evidence | None:
    """The call's decisive utterances for a round's label (None: the call shows no text at all)."""
    return _evidence(_shown(call, visible_chars), Round(round_), label, call.labels.scene, quote_chars)


# a call's prefixes often show the same text (the prompt's window): the same evidence
@lru_cache(maxsize=1 << 12)
def _evidence(
    turns: tuple[tuple[str, str], ...], round_: Round, label: Any, scene: str | None, quote_chars: int
) -> Evidence | None:
    clauses = _clauses(turns)
    if not clauses:
        return None
    fraud_side = _fraud_side(round_, label)
    pool = [c for c in clauses if c.speaker == CALLER] if fraud_side else clauses
    hits = [score_clause(c, round_, label, scene, quote_chars) for c in pool or clauses]
    ranked = tuple(
        sorted((h for h in hits if h.score > 0), key=lambda h: (-h.score, h.clause.turn, h.clause.start))
    )
    first = next((c for c in clauses if c.speaker == CALLER), clauses[0])
    fallback = score_clause(first, round_, label, scene, quote_chars)
    if round_ is Round.FRAUD and label is True:
        # the caller's cues together: an identity with an anomaly counts, as does any single request
        salient = sum(_WEIGHT[c] for c in {cue.cue for h in ranked for cue in h.cues}) >= SALIENT
    else:  # a word of the type or the scene, or (normal calls) the service asked for
        salient = any(h.label_words for h in ranked) or (not fraud_side and bool(ranked))
    return Evidence(ranked, fallback, salient, clauses)


# --------------------------------------------------------------------------------------------- rationale


@dataclass(frozen=True)
class Rationale:
    """A reference answer's reasoning: the think, the answer's reason, the quotes, whether the label is given."""

    think: str
    reason: str
    quotes: tuple[str, ...]
    label_given: bool


class RationaleWriter:
    """Writes per-call rationales from a prompt set's templates, never the same think for two keys.

    One writer per built split (shared by its offline and real-time rows): `write` returns the same rationale
    for the same key (the SFT target and the GRPO reference answer of a round agree), and a think text taken by
    one key is never given to another (see the module docstring for how a second call is told apart).
    """

    def __init__(self, prompts: PromptSet, *, quote_chars: int = DEFAULT_QUOTE_CHARS) -> None:
        if quote_chars < 1:
            raise ValueError(f"quote_chars must be at least 1, got {quote_chars}")
        self.prompts, self.quote_chars = prompts, quote_chars
        self._written: dict[Hashable, Rationale] = {}
        self._asked: dict[Hashable, Hashable] = {}  # (key, round, stage, allow_null) -> the written key
        self._taken: set[str] = set()
        self.shared = 0  # keys that had to share a think (calls identical in everything quotable)

    def write(
        self,
        call: CallRecord,
        round_: Round | str,
        label: Any,
        *,
        key: Hashable,
        stage: Stage | str | None = None,
        visible_chars: int | None = None,
        allow_null: bool = False,
    ) -> Rationale:
        """The rationale of one round of `call` for `label`; the same `key` gets the same rationale.

        `stage`: the real-time stage lead (None: offline, no lead). `visible_chars`: the transcript window of
        the prompt (quotes come from what the model sees). `allow_null`: an early-stage prefix whose visible
        part holds no salient evidence gets the "information insufficient" think and a null label.
        """
        round_ = Round(round_)
        asked = (key, round_.value, None if stage is None else str(stage), allow_null)
        if asked in self._asked:
            return self._written[self._asked[asked]]
        evidence = find_evidence(
            call, round_, label, visible_chars=visible_chars, quote_chars=self.quote_chars
        )
        if allow_null and str(stage) == Stage.EARLY and (evidence is None or not evidence.salient):
            label = None
        # a given label is the same answer whether or not a null was allowed (SFT target = GRPO reference)
        key = self._asked[asked] = (*asked[:3], label is None)
        if key in self._written:
            return self._written[key]
        context = _Context(round_, label, stage, call.labels.scene)
        rationale: Rationale | None = None
        for candidate in self._candidates(call, context, evidence, visible_chars):
            rationale = rationale or candidate
            if candidate.think not in self._taken:
                rationale = candidate
                break
        else:
            self.shared += 1  # every form is taken: the calls are alike in everything quotable
        assert rationale is not None
        self._written[key] = rationale
        self._taken.add(rationale.think)
        return rationale

    # --- composing -----------------------------------------------------------------------------------

    def _candidates(
        self, call: CallRecord, context: _Context, evidence: Evidence | None, visible_chars: int | None
    ) -> Iterator[Rationale]:
        if evidence is None:  # no transcript (audio-only call): nothing to quote
            yield self._compose(context, [], [], "")
            return
        if context.label is None:  # "only the opening so far": quote the opening, nothing beyond the prefix
            yield from self._forms(context, evidence.fallback, evidence)
            yield from self._pairs(call, context, evidence.fallback, evidence, visible_chars)
            return
        for primary in evidence.hits[:3] or [evidence.fallback]:
            yield from self._forms(context, primary, evidence)
        whole, window = evidence, visible_chars
        if visible_chars is not None:  # beyond the prompt's window: still the call's own words
            whole = (
                find_evidence(call, context.round, context.label, quote_chars=self.quote_chars) or evidence
            )
            window = None
            for primary in [*whole.hits[:3], whole.fallback]:
                yield from self._forms(context, primary, whole)
        yield from self._pairs(call, context, whole.hits[0] if whole.hits else whole.fallback, whole, window)

    def _pairs(
        self, call: CallRecord, context: _Context, primary: Hit, evidence: Evidence, visible_chars: int | None
    ) -> Iterator[Rationale]:
        """Last resort: the quote with each other clause in turn, then whole short turns (two calls that differ
        only in a word differ there)."""
        for clause in evidence.clauses:
            if clause != primary.clause:
                other = Hit(clause, 0.0, (), 0, _quote(clause, 0, self.quote_chars))
                yield self._rationale(context, primary, [primary, other], None, number=False)
        for i, shown in enumerate(visible_lengths(call, visible_chars)):
            turn = call.turns[i]
            text = turn.text[:shown].strip()
            if 0 < len(text) <= self.quote_chars and not any(mark in text for mark in '“”"'):
                whole = Hit(Clause(i, turn.speaker, turn.text.index(text), text), 0.0, (), 0, text)
                yield self._rationale(context, whole, [whole], None, number=True)

    def _forms(self, context: _Context, primary: Hit, evidence: Evidence) -> Iterator[Rationale]:
        """The rationale quoting `primary` (with a second quote when one adds evidence), then the forms that tell
        two calls apart while staying true to the call: the second quote, the other speaker's reply, the quote's
        turn number."""
        counted = {c.cue for c in primary.cues}
        others = [h for h in evidence.hits if h.clause != primary.clause]
        # the second quote: one that adds a cue, else the next best, else the caller's next clause
        adding = next((h for h in others if {c.cue for c in h.cues} - counted or h.label_words), None)
        second = adding or (others[0] if others else None)
        if second is None:
            later = (
                c
                for c in evidence.clauses
                if c.speaker == CALLER and (c.turn, c.start) > (primary.clause.turn, primary.clause.start)
            )
            clause = next(later, None)
            second = Hit(clause, 0.0, (), 0, _quote(clause, 0, self.quote_chars)) if clause else None
        reply = None
        if primary.clause.speaker == CALLER:  # the callee's answer to the quoted turn (not the second quote)
            replies = (
                c
                for c in evidence.clauses
                if c.speaker != CALLER
                and c.turn > primary.clause.turn
                and (second is None or c != second.clause)
            )
            clause = next(replies, None)
            reply = Hit(clause, 0.0, (), 0, clause.text[:SHORT_REPLY]) if clause else None
        # two quotes by default when the second adds evidence (another cue, words of the label)
        two = adding is not None and context.label is not None
        for number in (False, True):
            for with_second, with_reply in ((two, False), (not two, False), (True, True), (two, True)):
                if with_reply and reply is None:
                    continue
                quotes = [primary, second] if with_second and second else [primary]
                yield self._rationale(context, primary, quotes, reply if with_reply else None, number=number)

    def _rationale(
        self, context: _Context, primary: Hit, quotes: list[Hit], reply: Hit | None, *, number: bool
    ) -> Rationale:
        """The rationale quoting `quotes` in the call's order (and the reply), the primary's turn numbered."""
        r = self.prompts.rationales
        quotes = sorted(quotes, key=lambda h: (h.clause.turn, h.clause.start))
        parts = []
        for i, hit in enumerate(quotes):
            if i and hit.clause.speaker == quotes[i - 1].clause.speaker:  # the same speaker goes on
                text = fill(r.also, {"evidence": hit.quote})
            else:
                text = self.prompts.evidence(hit.quote, callee=hit.clause.speaker != CALLER)
            if number and hit is primary:
                text += fill(r.turn, {"turn": str(hit.clause.turn + 1)})
            parts.append(text)
        if reply is not None:
            parts.append(fill(r.reply, {"evidence": reply.quote}))
        said = [h.quote for h in quotes] + ([reply.quote] if reply else [])
        return self._compose(context, quotes, said, r.separator.join(parts))

    def _compose(self, context: _Context, hits: list[Hit], quotes: list[str], quote_text: str) -> Rationale:
        r = self.prompts.rationales
        fields = {
            "stage": "" if context.stage is None else r.stages.of(str(context.stage)),
            "quote": quote_text,
            "cue": self._cue(hits),
            "pattern": self._pattern(context),
            "label": "" if context.label is None else str(context.label),
        }
        if quote_text:
            think = fill(self.prompts.think_template(context.round, context.label), fields).strip()
        else:  # a call without a transcript: the think without the quote and the punctuation after it
            think = fill(self.prompts.think_template(context.round, context.label), {**fields, "quote": "\0"})
            think = _AFTER_QUOTE.sub("", think).strip()
        if context.label is None:
            reason = self.prompts.insufficient  # the parser reads it back as `insufficient`
        else:
            reason = fill(self.prompts.reason_template(context.round, context.label), fields).strip()
        return Rationale(think, reason, tuple(quotes), context.label is not None)

    def _cue(self, hits: list[Hit]) -> str:
        """What the quoted words do: their two heaviest cues."""
        cues = self.prompts.rationales.cues
        found = sorted(
            {c.cue: c for h in reversed(hits) for c in h.cues}.values(), key=lambda c: -_WEIGHT[c.cue]
        )
        if not found:
            return cues.none
        words = [cues.of(c.cue, c.word, strong=c.strong) for c in found[:2]]
        return self.prompts.rationales.cue_join.join(dict.fromkeys(words))

    def _pattern(self, context: _Context) -> str:
        patterns = self.prompts.rationales.patterns
        if context.label is None:
            return ""
        if context.round is Round.FRAUD:
            if context.label:
                return patterns["fraud"]
            return patterns.get(context.scene or "normal", patterns["normal"])
        return patterns[str(context.label)]


@dataclass(frozen=True)
class _Context:
    round: Round
    label: Any  # None: the "information insufficient" target
    stage: Stage | str | None
    scene: str | None  # names a normal call's pattern in the is_fraud round


# ----------------------------------------------------------------------------------------------- figures


def quotes_in(think: str) -> list[str]:
    """The quoted spans of a reasoning text (“...” or "...")."""
    return [a or b for a, b in _QUOTED.findall(think)]


def reasoning_figures(
    answers: Iterable[tuple[str, str]], *, windows: Sequence[str] | None = None
) -> dict[str, Any]:
    """The distinct-reasoning and evidence figures of (call transcript, answer text) pairs.

    Works alike on reference targets and on model outputs (read with the contract's parser):

    - `answers`: pairs given; `with_think`: answers that hold a `<think>` text;
    - `distinct_reasoning_rate`: distinct think texts / answers (an answer without a think adds none);
    - `quoting_rate`: answers whose think quotes the call (“...” or "...") / answers;
    - `evidence_in_transcript_rate`: quoted spans found verbatim in their call's transcript / quoted spans
      (0.0 when nothing is quoted); `answers_with_all_quotes_found`: answers that quote and every quote is found;
    - `mean_think_chars`, `max_think_chars`: think length in characters;
    - with `windows` (per pair, the transcript as the prompt showed it): `evidence_in_prompt_rate`, quoted spans
      found in the window / quoted spans.
    """
    n = 0
    thinks: list[str] = []
    quoting = all_found = quotes = found = shown = 0
    for i, (transcript, answer) in enumerate(answers):
        n += 1
        think = parse_output(answer).think
        if not think:
            continue
        thinks.append(think)
        spans = quotes_in(think)
        if not spans:
            continue
        quoting += 1
        hits = sum(span in transcript for span in spans)
        quotes, found = quotes + len(spans), found + hits
        all_found += hits == len(spans)
        if windows is not None:
            shown += sum(span in windows[i] for span in spans)
    lengths = [len(t) for t in thinks]
    extra = (
        {"evidence_in_prompt_rate": round(shown / quotes, 4) if quotes else 0.0}
        if windows is not None
        else {}
    )
    return {
        "answers": n,
        "with_think": len(thinks),
        "distinct_thinks": len(set(thinks)),
        "distinct_reasoning_rate": round(len(set(thinks)) / n, 4) if n else 0.0,
        "quoting_rate": round(quoting / n, 4) if n else 0.0,
        "quotes": quotes,
        "evidence_in_transcript_rate": round(found / quotes, 4) if quotes else 0.0,
        "answers_with_all_quotes_found": all_found,
        "mean_think_chars": round(statistics.fmean(lengths), 1) if lengths else 0.0,
        "max_think_chars": max(lengths, default=0),
        **extra,
    }
