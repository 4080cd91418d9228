"""Known values for the text metrics, Chinese and English."""

import math

import pytest

from tunelab.evaluate.metrics import (
    char_f1, exact_match, lcs_length, normalize_text, perplexity, rouge_l, word_tokens,
)


def test_normalize_drops_punctuation_space_case_and_width():
    assert normalize_text("  Hello, World! ") == "helloworld"
    assert normalize_text("我是甄嬛，家父是大理寺少卿甄远道。") == "我是甄嬛家父是大理寺少卿甄远道"
    assert normalize_text("ＡＢＣ１２３") == "abc123"  # full-width
    assert normalize_text("3+4=7, $5") == "3+4=7$5"  # symbols (S*) carry meaning
    assert normalize_text("50%") == "50"  # % is Unicode punctuation (Po)


def test_char_f1_chinese():
    # pred 我是甄嬛 (4 chars), ref 我是皇后 (4 chars): overlap 我,是 -> P = R = 0.5
    assert char_f1("我是甄嬛。", "我是皇后") == pytest.approx(0.5)
    assert char_f1("甄嬛", "甄嬛") == 1.0
    assert char_f1("你好", "再见") == 0.0


def test_char_f1_counts_repeats_once_per_occurrence():
    # pred aab, ref ab: overlap a,b = 2; P = 2/3, R = 1 -> F1 = 0.8
    assert char_f1("aab", "ab") == pytest.approx(0.8)


def test_char_f1_is_character_level_for_english_too():
    assert char_f1("cat", "act") == 1.0  # documented: order is ignored


def test_empty_strings():
    assert char_f1("", "") == 1.0
    assert char_f1("", "abc") == 0.0
    assert rouge_l("。", "") == 1.0  # only punctuation normalizes to empty
    assert rouge_l("abc", "") == 0.0


def test_exact_match_normalized():
    assert exact_match("Paris.", " paris") == 1.0
    assert exact_match("北京。", "北京") == 1.0
    assert exact_match("北京市", "北京") == 0.0


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("甄嬛传"), list("甄传")) == 2


def test_rouge_l_char_chinese():
    # pred 我是甄嬛 (4), ref 我是甄远道的女儿 (8): LCS 我是甄 = 3; P 3/4, R 3/8
    p, r = 3 / 4, 3 / 8
    assert rouge_l("我是甄嬛", "我是甄远道的女儿") == pytest.approx(2 * p * r / (p + r))


def test_rouge_l_order_matters_unlike_char_f1():
    assert rouge_l("cat", "act") == pytest.approx(2 / 3)


def test_rouge_l_token_level_english():
    # tokens: [the, cat, sat] vs [the, cat, sat, down]: LCS 3; P 1, R 3/4
    assert rouge_l("The cat sat.", "the cat sat down", level="token") == pytest.approx(2 * 0.75 / 1.75)
    assert word_tokens("Hello, 世界 x2!") == ["hello", "世", "界", "x2"]


def test_rouge_l_beta_weights_recall():
    # P = 1, R = 0.5: beta -> large gives recall
    assert rouge_l("ab", "abcd", beta=100) == pytest.approx(0.5, abs=1e-3)


def test_rouge_l_rejects_unknown_level():
    with pytest.raises(ValueError, match="level"):
        rouge_l("a", "a", level="word")  # type: ignore[arg-type]


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))
