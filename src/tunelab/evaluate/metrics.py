"""Text-overlap metrics for comparing a model's answer with a reference answer.

Pure Python, no dependencies, and language-agnostic by design: the reference data
(a Chinese role-play set) has no spaces between words, so every default here works on
characters, not words. For English the same functions are still character-level
(`char_f1("cat", "act") == 1.0`); use `rouge_l(..., level="token")` when word order
and word identity matter for space-separated text.

All scores are floats in [0, 1]. Two empty strings (after normalization) score 1.0: the
model said nothing and nothing was expected. One empty side scores 0.0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Literal, Sequence

__all__ = [
    "normalize_text",
    "char_tokens",
    "word_tokens",
    "char_f1",
    "exact_match",
    "lcs_length",
    "rouge_l",
    "perplexity",
]

# One CJK ideograph (or kana / hangul syllable) is one token at token level; a run of
# letters/digits is one token. This keeps `word_tokens` useful on mixed zh/en text.
_CJK = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
)
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize_text(text: str) -> str:
    """Canonical form used by every metric here.

    NFKC (so full-width `１２３ＡＢ` equals `123AB` and `，` equals `,`), casefold, then
    drop punctuation (Unicode category P*, which includes `%` and `#`) and whitespace.
    Symbols (category S*: `+`, `=`, `$`, `°`) are kept: in `3+4=7` they carry meaning.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def char_tokens(text: str) -> list[str]:
    """Characters of the normalized text."""
    return list(normalize_text(text))


def word_tokens(text: str) -> list[str]:
    """Words for token-level metrics: each CJK character alone, else runs of letters/digits.

    Punctuation and whitespace separate tokens and are dropped; text is NFKC-normalized
    and casefolded first, as in `normalize_text`.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WORD_RE.findall(text)


def _tokens(text: str, level: Literal["char", "token"]) -> list[str]:
    if level == "char":
        return char_tokens(text)
    if level == "token":
        return word_tokens(text)
    raise ValueError(f"level must be 'char' or 'token', got {level!r}")


def _f_measure(overlap: int, n_pred: int, n_ref: int, beta: float = 1.0) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    beta2 = beta * beta
    return (1 + beta2) * precision * recall / (recall + beta2 * precision)


def char_f1(prediction: str, reference: str) -> float:
    """Bag-of-characters F1 between normalized prediction and reference.

    Overlap counts each character at most as often as it occurs on both sides (multiset
    intersection), as in SQuAD's token F1 but over characters, which is the usual choice
    for Chinese. Order is ignored; `rouge_l` is the order-aware counterpart.
    """
    pred, ref = char_tokens(prediction), char_tokens(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(overlap, len(pred), len(ref))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):  # the row is over the shorter side to keep memory small
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item_a in a:
        current = [0]
        for j, item_b in enumerate(b, start=1):
            if item_a == item_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(
    prediction: str,
    reference: str,
    level: Literal["char", "token"] = "char",
    beta: float = 1.0,
) -> float:
    """ROUGE-L F-measure: LCS-based precision and recall combined with weight `beta`.

    Args:
        prediction: The model's answer.
        reference: The expected answer.
        level: `char` (default; right for Chinese, also applied to English) compares
            normalized characters; `token` compares `word_tokens` (words for
            space-separated text, single characters for CJK).
        beta: Recall weight; 1.0 gives the plain F1 most Chinese benchmarks report
            (the original ROUGE paper used a large beta, i.e. nearly pure recall).
    """
    pred, ref = _tokens(prediction, level), _tokens(reference, level)
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref), beta)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf on overflow, NaN stays NaN.

    The loss must be the mean over supervised tokens (as HF models return it), not a
    mean of per-batch means when batches hold different token counts.
    """
    if math.isnan(mean_loss):
        return math.nan
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
