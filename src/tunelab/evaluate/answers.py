"""Reading what an answer asserts: numbers, echoes of the question, negations, hedges.

The graders in `checkers.py` ask "does the answer say X?", not "does X occur in it?".
The difference is what this module reads:

- **echo**: text copied from the question proves nothing. `strip_echo` blanks every
  sentence of the question (5+ characters) found in the answer, so a model
  that parrots "1.11 和 1.9 哪个大？" or the sentence a number is to be picked from is
  graded on what it added, which is nothing.
- **negation**: a mention right after "not", "isn't", "不是", "并非", "而非", "不" ... or
  right before "is not" / "不是" is denied, not asserted ("法国的首都不是巴黎").
- **hedge**: a mention joined to an alternative by "or", "或", "或者", "还是", "/" is
  not a verdict ("星期四或星期五", "7 or 8").
- **comparison object**: a mention right after "than", "比", "from", "从" is the thing
  compared with, not the answer ("K2 is higher than Everest").
- **numbers**: `number_mentions` reads digits (signs, decimals, 1,000 separators, 1.5万),
  and, when an answer has no digits, Chinese numerals (十二, 负五, 二点五) and English
  words (minus five, three hundred sixty-six). `asserted_numbers` then drops the ones an
  answer does not conclude: inside parentheses ("85 (38+47)"), operands of + - × ÷ and
  the left side of = ("3 + 4 = 7"), and the negated, hedged or compared ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Mention", "asserted", "asserted_numbers", "choice_verdict", "clauses", "extract_numbers", "option_value",
           "number_mentions", "strip_echo"]

# Fullwidth digits and the minus sign get mapped by hand; full NFKC would also turn the
# Chinese comma `，` into `,` and glue "100，200" into one number.
_DIGIT_MAP = str.maketrans("０１２３４５６７８９．－−", "0123456789.--")
_ARABIC_RE = re.compile(r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s?[万亿千](?![克米瓦]))?"
                        r"|(?<![\d.])\.\d+")
_SCALE = {"千": 1e3, "万": 1e4, "亿": 1e8}
_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4,
              "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000}
_ZH_BIG = {"万": 10_000, "亿": 100_000_000}
_ZH_RE = re.compile("负?[零〇一二两三四五六七八九十百千万亿]+(?:点[零〇一二三四五六七八九]+)?")
_EN_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
             "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
             "seventeen", "eighteen", "nineteen"]
_EN_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
            "seventy": 70, "eighty": 80, "ninety": 90}
_EN_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_EN_WORD = "|".join(sorted([*_EN_UNITS, *_EN_TENS, *_EN_SCALES], key=len, reverse=True))
_EN_RE = re.compile(rf"\b(?:(?:minus|negative)\s+)?(?:{_EN_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_EN_WORD}))*\b",
                    re.IGNORECASE)


@dataclass(frozen=True)
class Mention:
    """A number (or option) found in a text: where it is and what it says."""

    start: int
    end: int
    value: float


def _zh_integer(text: str) -> int:
    total = section = digit = 0
    for ch in text:
        if ch in _ZH_DIGITS:
            digit = _ZH_DIGITS[ch]
        elif ch in _ZH_UNITS:
            section += (digit or 1) * _ZH_UNITS[ch]  # bare 十 means 一十
            digit = 0
        else:  # 万 / 亿 scale everything before them
            total = (total + section + digit) * _ZH_BIG[ch]
            section = digit = 0
    return total + section + digit


def _zh_number(text: str) -> float:
    sign = -1 if text.startswith("负") else 1
    whole, _, fraction = text.lstrip("负").partition("点")
    value = float(_zh_integer(whole)) if whole else 0.0
    if fraction:
        value += float("0." + "".join(str(_ZH_DIGITS[ch]) for ch in fraction))
    return sign * value


def _en_number(text: str) -> Optional[float]:
    words = [w for w in re.split(r"[\s-]+", text.lower()) if w and w != "and"]
    sign = -1.0 if words and words[0] in ("minus", "negative") else 1.0
    words = words[1:] if sign < 0 else words
    total = current = 0
    for word in words:
        if word in _EN_SCALES:
            scale = _EN_SCALES[word]
            if scale == 100:
                current = (current or 1) * 100
            else:
                total += (current or 1) * scale
                current = 0
        elif word in _EN_TENS:
            current += _EN_TENS[word]
        else:
            current += _EN_UNITS.index(word)
    return sign * (total + current)


def number_mentions(text: str) -> list[Mention]:
    """Every number in `text`, in reading order (see the module docstring for what counts)."""
    text = text.translate(_DIGIT_MAP)
    mentions = []
    for match in _ARABIC_RE.finditer(text):
        raw = match.group()
        scale = _SCALE.get(raw[-1], 1.0)
        value = float(raw.rstrip("万亿千 ").replace(",", "")) * scale
        start = match.start()
        # A '-' or 负 before the digits is a sign unless it joins ASCII words or numbers
        # ("COVID-19", "7-2"); after CJK text ("温度是-5") it is a sign.
        before = text[start - 1] if start else ""
        joined = start >= 2 and text[start - 2].isascii() and text[start - 2].isalnum()
        if before == "负" or (before == "-" and not joined):
            value, start = -value, start - 1
        mentions.append(Mention(start, match.end(), value))
    if mentions:
        return mentions
    # Word numerals only when there are no digits: "一样" or "no one" would otherwise
    # add spurious numbers next to the real answer.
    # A run needs a digit or 十: alone, 千万 ("by all means") or 百 are words, not numbers.
    mentions = [Mention(m.start(), m.end(), _zh_number(m.group())) for m in _ZH_RE.finditer(text)
                if re.search("[零〇一二两三四五六七八九十]", m.group())]
    mentions += [Mention(m.start(), m.end(), _en_number(m.group())) for m in _EN_RE.finditer(text)
                 if re.search(rf"\b(?:{'|'.join([*_EN_UNITS, *_EN_TENS])})\b", m.group(), re.IGNORECASE)]
    return sorted(mentions, key=lambda m: m.start)


def extract_numbers(text: str) -> list[float]:
    """Numbers in `text`, in reading order."""
    return [m.value for m in number_mentions(text)]


# ---------------------------------------------------------------- clauses and echoes

_SENTENCE_END = r"[。！？!?\n“”\"「」]|[.:：](?=\s|$)"
_CLAUSE_END = _SENTENCE_END + r"|[，、；;]|,(?=\s|$)"


def clauses(text: str, sentence: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each clause (or sentence) of `text`, split at punctuation."""
    spans, start = [], 0
    for match in re.finditer(_SENTENCE_END if sentence else _CLAUSE_END, text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _flexible(piece: str) -> re.Pattern[str]:
    return re.compile(r"\s*".join(re.escape(ch) for ch in piece if not ch.isspace()), re.IGNORECASE)


def strip_echo(answer: str, question: Optional[str]) -> str:
    """`answer` with every sentence of `question` (5+ non-space characters) it copies
    blanked out, longest first: what is left is what the answer added. Sentences, not
    clauses: "The jacket now costs 60 dollars." answers a question quoting "The jacket
    now costs 60 dollars, down from 85 dollars."; echoing that whole sentence does not."""
    if not question:
        return answer
    # no NFKC here: it would turn "，" into "," and glue "100，200" into one number
    text, q = answer, question
    pieces = {q[a:b].strip() for a, b in clauses(q, sentence=True)}
    for piece in sorted(pieces, key=len, reverse=True):
        if len("".join(piece.split())) >= 5:
            text = _flexible(piece).sub(lambda m: " " * len(m.group()), text)
    return text


# ---------------------------------------------------------------- what a mention asserts

_QUOTES = r"[\"'“”‘’「」《》*]*"
# up to two words may sit between a cue and a mention ("not William Shakespeare", "or The
# Pacific Ocean"), but not a word that turns the sentence ("not Milan but Rome")
_BETWEEN = r"(?:(?!(?:but|rather|instead|it|is|was|the\s+answer)\b)[\w'-]+\s+){0,2}"
_NEG_BEFORE = re.compile(
    rf"(?:\b(?:not|isn't|isnt|aren't|wasn't|never|no|nor)\b\s+{_BETWEEN}|"
    rf"(?:不是|并非|而非|并不是|不|非|没有|別|别)\s*){_QUOTES}\s*$", re.IGNORECASE)
# after a mention, the rest of its word may come first ("Everest's", "珠穆朗玛峰"), but not a
# word that turns the sentence ("是巴黎而不是里昂")
_WORD_REST = r"(?:[A-Za-z'-]+|(?![而但却并也])[\u4e00-\u9fff])?"
_NEG_AFTER = re.compile(rf"^{_WORD_REST}\s*{_QUOTES}\s*(?:is\s+not\b|isn't\b|is\s+wrong\b|不是|并不是|不对|是错)",
                        re.IGNORECASE)
_HEDGE_BEFORE = re.compile(rf"(?:\bor\s+{_BETWEEN}|\beither\s+{_BETWEEN}|(?:或者|或是|或|还是|/)\s*){_QUOTES}\s*$",
                           re.IGNORECASE)
_HEDGE_AFTER = re.compile(rf"^(?:{_WORD_REST}|\s+[A-Z][\w-]*)?\s*{_QUOTES}\s*(?:or\b|或者|或是|或(?!许)|还是(?![很那这挺])|/)")
_OBJECT_BEFORE = re.compile(r"(?:\bthan|比|不如)\s*(?:the\s+)?[\"'“”‘’「」《》*]*\s*$", re.IGNORECASE)
_START_BEFORE = re.compile(r"(?:\bfrom|从)\s*$", re.IGNORECASE)  # "from 85 to 60": for numbers only


def _clause_of(text: str, start: int, end: int) -> tuple[int, int]:
    for a, b in clauses(text):
        if a <= start < b or (a < end <= b):
            return a, b
    return 0, len(text)


def asserted(text: str, start: int, end: int, numeric: bool = False) -> bool:
    """Is the mention text[start:end] asserted, rather than negated, hedged or compared with
    (or, for a number, the starting point of a change: "from 85 to 60")?"""
    a, b = _clause_of(text, start, end)
    before, after = text[a:start], text[end:b]
    if _NEG_BEFORE.search(before) or _NEG_AFTER.search(after):
        return False
    if _HEDGE_BEFORE.search(before) or _HEDGE_AFTER.search(after):
        return False
    return not (_OBJECT_BEFORE.search(before) or (numeric and _START_BEFORE.search(before)))


_OPERATOR = (r"[+\-×/÷]|(?<![*])\*(?![*])|(?<![A-Za-z])[xX](?![A-Za-z])|加上?|减去?|乘以?|除以?"
             r"|\bplus\b|\bminus\b|\btimes\b|\bdivided by\b|\bmultiplied by\b")
_UNIT = r"(?:\s*(?:[A-Za-z°%]+\.?|[\u4e00-\u9fff]{1,3}))?"
_OPERAND_BEFORE = re.compile(rf"(?:{_OPERATOR})\s*$", re.IGNORECASE)
_OPERAND_AFTER = re.compile(rf"^{_UNIT}\s*(?:{_OPERATOR}|=|等于|equals\b)\s*[-\d.(（零一二两三四五六七八九十]",
                            re.IGNORECASE)
_RANGE_AFTER = re.compile(rf"^{_UNIT}\s*(?:到|至|~|～|\bto\b)\s*[-\d.零一二两三四五六七八九十]", re.I)
_RANGE_BEFORE = re.compile(rf"\d{_UNIT}\s*(?:到|至|~|～|\bto\b)\s*$", re.I)
_LISTED_AFTER = re.compile(rf"^{_UNIT}\s*(?:\band\b|&|和|与|跟)\s*[-\d.零一二两三四五六七八九十]", re.I)
_LISTED_BEFORE = re.compile(rf"\d{_UNIT}\s*(?:\band\b|&|和|与|跟)\s*$", re.I)
_OPEN, _CLOSE = "(（[【", ")）]】"


def _in_parentheses(text: str, position: int) -> bool:
    depth = 0
    for ch in text[:position]:
        depth += ch in _OPEN
        depth -= ch in _CLOSE and depth > 0
    return depth > 0


def asserted_numbers(text: str) -> list[Mention]:
    """The numbers `text` concludes, in reading order: not in parentheses, not an operand of
    working ("3 + 4 = 7" concludes 7), not negated, hedged or compared with."""
    norm = text.translate(_DIGIT_MAP)
    kept = []
    for m in number_mentions(text):
        before, after = norm[:m.start], norm[m.end:]
        if _in_parentheses(norm, m.start):
            continue
        if _OPERAND_BEFORE.search(before) and not re.search(r"(?:^|[=:：]|等于|是|is)\s*-$", before):
            continue
        if _OPERAND_AFTER.search(after):
            continue
        clause = norm[_clause_of(norm, m.start, m.end)[0]:m.start]
        if (_RANGE_AFTER.search(after) or _RANGE_BEFORE.search(before)) and not re.search(r"\bfrom\b|从", clause, re.I):
            continue  # "41 到 42", "7 to 8": a range is a hedge ("from 18 to 7" is not)
        if _LISTED_AFTER.search(after) or _LISTED_BEFORE.search(before):
            continue  # "5 and 45", "5 和 45": both candidates listed, neither concluded
        if not _stands_alone(norm, m):
            continue
        if asserted(norm, m.start, m.end, numeric=True):
            kept.append(m)
    return kept


_MEASURE = ("个|人|元|块|角|分钟|分|秒|小时|时|天|日|周|星期|月|年|岁|次|件|名|户|栋|层|号|页|张|位|条|辆|台|种|本|只|"
            "支|杯|瓶|颗|道|米|公里|千米|厘米|毫米|克|千克|公斤|斤|吨|升|毫升|度|倍|平方|立方|摄氏|华氏|英寸|英尺|码|点|"
            "加|减|乘|除|等|是|和|与|或|到|至|比|的|了|呢|吧|啊|呀|哦|嘛|，|。")
_STANDS_AFTER = re.compile(rf"^(?:$|[\s\W_]|(?:{_MEASURE})|[A-Za-z°%]+(?![A-Za-z]))")


def _stands_alone(text: str, m: Mention) -> bool:
    """A concluded number is not glued into other text: "这7国" or "er7" in a token soup
    (what random weights write) says nothing; "7", "7 个", "7个苹果", "7 km" do."""
    before = text[m.start - 1] if m.start else ""
    if before.isascii() and before.isalpha() and text[m.start:m.start + 1].isdigit():
        return False  # "A123", "H2O", "er7"
    if re.match(r"[负零〇一二两三四五六七八九十]", text[m.start:m.start + 1]) and \
            re.match(r"[\u4e00-\u9fff]", before) and before not in "是为有共约于了到得":
        return False  # "自一" in a soup; "是十二" and "共十二个" are numbers
    after = text[m.end:]
    if after[:1].isascii() and after[:1].isalpha():  # "7km" is a unit, "7ing" is not
        return re.match(r"^(?:k?m|cm|mm|kg|g|mg|l|ml|s|min|h|hrs?|days?|st|nd|rd|th|x|°[CF])(?![A-Za-z])",
                        after, re.I) is not None
    return _STANDS_AFTER.match(after) is not None


# ---------------------------------------------------------------- choice between options

_MORE = r"larger|bigger|greater|higher|heavier|longer|more|大|多|重|高|长"
_LESS = r"smaller|less|lower|lighter|shorter|fewer|小|少|轻|低|短"
_ASK_MORE = re.compile(r"larger|bigger|greater|higher|heavier|longer|more|哪个大|那个大|较大|更大|哪个重|更重|哪个多", re.I)
_ASK_LESS = re.compile(r"smaller|less|lower|lighter|shorter|fewer|哪个小|那个小|较小|更小|哪个轻|哪个少", re.I)
_WORD_MORE = re.compile(r"\b(?:larger|bigger|greater|higher|heavier|longer)\b|更大|较大|大一些|大些|最大|大于|"
                        r"更重|较重|更多|(?<![不])大(?=\s*[。！!.，,呢啊哦吧]|\s*$)", re.I)
_WORD_LESS = re.compile(r"\b(?:smaller|lower|lighter|shorter|fewer)\b|\bless\b|更小|较小|小一些|小些|最小|小于|"
                        r"更轻|较轻|更少|(?<![不大])小(?=\s*[。！!.，,呢啊哦吧]|\s*$)", re.I)
_CONJUNCTION = re.compile(r"^\s*(?:,?\s*(?:and|or|vs\.?|versus)|和|与|跟|同|或者?|还是|、|,|/)\s*$", re.I)


def _direction(question: str) -> int:
    """+1 if the question asks for the larger option, -1 for the smaller, 0 if neither."""
    more, less = bool(_ASK_MORE.search(question)), bool(_ASK_LESS.search(question))
    return 1 if more and not less else -1 if less and not more else 0


def _relation(between: str, after: str) -> int:
    """+1 if "A <between> B <after>" says A is the larger, -1 the smaller, 0 neither."""
    sign = -1 if re.search(r"\bnot\b|n't|不", between, re.I) else 1
    if re.search(rf"(?:{_MORE})\s+than|>|大于|多于|重于|高于", between, re.I):
        return sign
    if re.search(rf"(?:{_LESS})\s+than|<|小于|少于|轻于|低于", between, re.I):
        return -sign
    if re.search(r"比", between):
        if re.match(rf"^\s*(?:更|要|还|稍|略|大约)?\s*(?:{_MORE})", after):
            return sign
        if re.match(rf"^\s*(?:更|要|还|稍|略|大约)?\s*(?:{_LESS})", after):
            return -sign
    return 0


def choice_verdict(text: str, mentions: Sequence[tuple[int, int, int]], n_options: int,
                   question: str = "") -> Optional[int]:
    """The option `text` picks, or None when it picks none or several.

    `mentions` are (start, end, option index) in reading order. Clause by clause: a
    restatement of options joined by and / 和 / or ("1.9 和 1.11 相比") decides nothing; a
    comparison of two options ("1.11 is smaller than 1.9", "1.9 比 1.11 大") picks the one
    the question asks for; a single asserted option picks itself, or, said to be the
    opposite of what was asked ("1.11 更小" when the larger is asked), the other one of
    two. Negated or hedged options pick nothing. Every clause that picks must agree.
    """
    ask = _direction(question)
    picks: set[int] = set()
    for a, b in clauses(text):
        inside = [m for m in mentions if a <= m[0] < b]
        while len(inside) >= 2 and inside[0][2] != inside[1][2] and \
                _CONJUNCTION.match(text[inside[0][1]:inside[1][0]]):
            inside = inside[2:]  # "A and B ...": a restatement; the rest of the clause may still decide
        live = [m for m in inside if asserted(text, m[0], m[1])]
        options = list(dict.fromkeys(m[2] for m in live))
        if not options:
            continue
        if len(options) >= 2:
            first = live[0]
            second = next(m for m in live if m[2] != first[2])
            previous = max((m for m in live if m[2] == first[2] and m[0] < second[0]), key=lambda m: m[0])
            relation = _relation(text[previous[1]:second[0]], text[second[1]:b])
            if relation and ask:
                picks.add(previous[2] if relation == ask else second[2])
                continue
            if "=" in text[a:b]:
                continue  # working ("1.9 = 1.90 and 1.11 = 1.11")
            return None  # two options, no verdict between them: a hedge
        if "=" in text[a:b]:
            continue  # working ("1.9 = 1.90"), not a verdict
        option = options[0]
        said = text[a:b]
        more, less = bool(_WORD_MORE.search(said)), bool(_WORD_LESS.search(said))
        opposite = (ask > 0 and less and not more) or (ask < 0 and more and not less)
        if opposite and n_options == 2:
            picks.add(1 - option)
        elif not opposite:
            picks.add(option)
    return picks.pop() if len(picks) == 1 else None


def option_value(option) -> Optional[float]:
    """An option as a number (1.9, "1,000"), or None for a text option."""
    if isinstance(option, (int, float)) and not isinstance(option, bool):
        return float(option)
    try:
        return float(str(option).strip().replace(",", ""))
    except ValueError:
        return None
