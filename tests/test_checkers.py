"""Each check type accepts right answers and rejects wrong ones; bad specs name file and id."""

import pytest

from tunelab.evaluate.checkers import (
    CHECKERS, ProbeError, extract_numbers, find_json_object, grade, load_probes, parse_probes,
    score_answers, self_test, validate_check,
)


def test_registry_has_every_documented_type():
    assert set(CHECKERS) >= {"number", "contains", "choice", "one_word", "json", "regex"}


@pytest.mark.parametrize("text, numbers", [
    ("1.11 和 1.9 哪个大？1.9。", [1.11, 1.9, 1.9]),
    ("It costs 1,250 dollars, not 100，200.", [1250, 100, 200]),  # Chinese comma is no separator
    ("温度是-5度，负3度，COVID-19, 7-2", [-5, -3, 19, 7, 2]),
    ("−4 and －2 and ４２", [-4, -2, 42]),
    (".5 and 3.", [0.5, 3]),
    ("十五个，二点五，一百零五，两万", [15, 2.5, 105, 20000]),
    ("千万别忘了", []),
    ("Seven days, twenty-one hours", [7, 21]),
    ("7 days, not seven", [7]),  # word numerals only when no digits
    ("没有数字", []),
])
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == pytest.approx(numbers)


@pytest.mark.parametrize("answer, mode, ok", [
    ("17 + 25 = 42", "last", True),
    ("42，因为 17 加 25", "last", True),  # the operands of working are not conclusions
    ("42，因为 17 加 25", "first", True),
    ("17 + 25 = 42", "any", True),
    ("42 or 42.0", "only", False),  # "or" hedges, even between equal values
    ("42 or 43", "only", False),
    ("四十二", "last", True),
    ("no idea", "last", False),
])
def test_number(answer, mode, ok):
    assert grade(answer, {"type": "number", "value": 42, "mode": mode}) is ok


def test_number_tolerance():
    assert grade("0.30000000000000004", {"type": "number", "value": 0.3})
    assert not grade("0.31", {"type": "number", "value": 0.3})
    assert grade("0.31", {"type": "number", "value": 0.3, "tol": 0.02})


def test_contains():
    spec = {"type": "contains", "any": ["巴黎", "Paris"]}
    assert grade("法国的首都是巴黎。", spec) and grade("PARIS", spec)
    assert not grade("里昂", spec)
    assert grade("Leonardo da  Vinci", {"type": "contains", "all": ["leonardo", "da vinci"]})
    assert not grade("Paris, not Lyon", {"type": "contains", "any": ["Paris"], "none": ["Lyon"]})
    assert grade("Mars.", {"type": "contains", "any": ["Mars"], "whole_word": True})
    assert not grade("Marshmallow", {"type": "contains", "any": ["Mars"], "whole_word": True})
    assert not grade("Marshmallow", {"type": "contains", "any": ["Mars"]})  # whole words by default
    assert grade("Marshmallow", {"type": "contains", "any": ["Mars"], "whole_word": False})


@pytest.mark.parametrize("answer, ok", [
    ("1.9", True),
    ("**1.9**", True),
    ("1.90", True),
    ("1.9 比 1.11 大。", True),
    ("在 1.11 和 1.9 中，1.9 更大。", True),  # restated options are skipped
    ("1.11 和 1.9 相比，1.11 更大。", False),
    ("1.11", False),
    ("1.11 比 1.9 小", False),  # documented limitation: first mention decides
    ("它们一样大", False),
    ("", False),
])
def test_choice_numeric(answer, ok):
    assert grade(answer, {"type": "choice", "value": "1.9", "options": ["1.11", "1.9"]}) is ok


def test_choice_text_options_match_whole_words_longest_first():
    spec = {"type": "choice", "value": "iron", "options": ["feathers", "iron"]}
    assert grade("Iron.", spec) and not grade("Feathers", spec) and not grade("ironic feathers", spec)
    city = {"type": "choice", "value": "北京", "options": ["北京市郊", "北京"]}
    assert grade("北京", city) and not grade("北京市郊", city)


@pytest.mark.parametrize("answer, ok", [
    ("Paris", True), ("paris.", True), ('"Paris"', True), ("**Paris**", True),
    ("The capital is Paris.", False), ("Paris, France", False), ("Lyon", False), ("", False),
])
def test_one_word_with_value(answer, ok):
    assert grade(answer, {"type": "one_word", "value": "Paris"}) is ok


def test_one_word_without_value_and_chinese():
    assert grade("well-known", {"type": "one_word"})
    assert not grade("two words", {"type": "one_word"})
    assert grade("蓝色。", {"type": "one_word"})
    assert not grade("晴朗的天空通常是蓝色", {"type": "one_word"})  # > 6 CJK chars, no spaces
    assert grade("蓝色", {"type": "one_word", "value": ["蓝", "蓝色"]})


def test_find_json_object():
    assert find_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert find_json_object('Sure! Here it is: {"a": {"b": 2}} Hope it helps.') == {"a": {"b": 2}}
    assert find_json_object("[1, 2]") is None
    assert find_json_object("{not json}") is None


def test_json():
    spec = {"type": "json", "keys": ["name", "age"], "values": {"name": "张伟", "age": 28}}
    assert grade('{"name": "张伟", "age": 28}', spec)
    assert grade('```json\n{"name": "张伟", "age": "28岁", "city": "上海"}\n```', spec)
    assert not grade('{"name": "张伟", "age": 82}', spec)
    assert not grade('{"name": "张伟"}', spec)
    assert not grade("张伟，28 岁", spec)
    assert grade('{"c": "TOKYO"}', {"type": "json", "keys": ["c"], "values": {"c": ["东京", "Tokyo"]}})


def test_regex():
    assert grade("The symbol is Au.", {"type": "regex", "pattern": r"\bAu\b"})
    assert not grade("because", {"type": "regex", "pattern": r"\bAu\b"})
    assert not grade("AU", {"type": "regex", "pattern": r"\bAu\b"})
    assert grade("YES", {"type": "regex", "pattern": r"^\W*yes\b", "ignore_case": True})


@pytest.mark.parametrize("check, message", [
    ({"type": "nope"}, "unknown check type 'nope'"),
    ({"type": "number"}, "needs value"),
    ({"type": "number", "value": 1, "tolerance": 0.1}, "unknown field"),
    ({"type": "number", "value": "1"}, "must be a number"),
    ({"type": "choice", "value": "3", "options": ["1", "2"]}, "exactly one of"),
    ({"type": "regex", "pattern": "("}, "does not compile"),
    ({"type": "contains"}, "needs `any` or `all`"),
    ({"type": "json", "keys": ["a"], "values": {"b": 1}}, "must be in `keys`"),
    ({"type": "one_word", "value": "two words"}, "single word"),
])
def test_validate_check_rejects(check, message):
    with pytest.raises(ValueError, match=message):
        validate_check(check)


def _item(**fields):
    item = {"id": "q1", "lang": "en", "category": "facts", "question": "Capital of France?",
            "check": {"type": "contains", "any": ["Paris"]}}
    item.update(fields)
    return {k: v for k, v in item.items() if v is not None}


def test_probe_file_errors_name_file_and_item(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "items:\n"
        "  - {id: ok, lang: en, category: c, question: q, check: {type: number, value: 1}}\n"
        "  - {id: broken, lang: en, category: c, question: q, check: {type: guess}}\n"
        "  - {id: noquestion, lang: en, category: c, check: {type: number, value: 1}}\n"
        "  - {id: ok, lang: en, category: c, question: q, check: {type: number, value: 2}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ProbeError) as error:
        load_probes(path)
    message = str(error.value)
    assert f"{path}: item 'broken': unknown check type 'guess'" in message
    assert f"{path}: item 'noquestion': missing field(s) question" in message
    assert f"{path}: item 'ok': duplicate id" in message


def test_parse_probes_field_checks():
    with pytest.raises(ProbeError, match="unknown field"):
        parse_probes([_item(refrence="Paris")], "f.yaml")
    with pytest.raises(ProbeError, match="`lang` must be a language code"):
        parse_probes([_item(lang="English")], "f.yaml")
    with pytest.raises(ProbeError, match="non-empty list"):
        parse_probes({"items": []}, "f.yaml")


def test_file_level_defaults_and_probes_key():
    data = {"lang": "en", "probes": [_item(lang=None, category=None)]}
    (probe,) = parse_probes(data)
    assert probe.lang == "en" and probe.category == ""


def test_self_test_and_score_answers():
    probes = parse_probes([_item(reference="Paris", wrong=["Lyon", "Paris!"])])
    assert self_test(probes) == ["q1: check accepts wrong answer 'Paris!'"]
    assert score_answers(probes, {"q1": "It is Paris."}) == {"q1": 1.0}
    with pytest.raises(KeyError, match="no answer"):
        score_answers(probes, {})


# ---------------------------------------------------------------- meaning, not substrings

CMP = {"type": "choice", "value": "1.9", "options": ["1.11", "1.9"]}
Q_CMP = "1.11 和 1.9 哪个大？"


@pytest.mark.parametrize("answer", [
    "1.9", "1.9 更大。", "1.11 和 1.9 相比，1.9 更大。", "1.11 is smaller than 1.9.", "1.9 比 1.11 大。",
    "1.11 比 1.9 小。", "1.9 is larger.", "Comparing 1.11 and 1.9, 1.9 is larger.", "1.9 > 1.11",
    "不是 1.11，是 1.9。", "1.9 = 1.90 > 1.11, so 1.9 is larger.", "回皇上，1.9 更大些呢。",
    "1.11 更小，所以答案是 1.9。", "1.11 和 1.9 哪个大？1.9 更大。",
])
def test_choice_accepts_verdicts_in_any_style(answer):
    assert grade(answer, CMP, Q_CMP), answer


@pytest.mark.parametrize("answer", [
    "1.9 和 1.11 相比，1.11 更大", "Comparing 1.9 and 1.11, 1.11 is larger.", "Between 1.9 and 1.11, I'd say 1.11",
    "1.11 和 1.9 哪个大？", "1.9 和 1.11", "1.9 or 1.11", "1.9 还是 1.11 呢", "可能是 1.9，也可能是 1.11。",
    "不是 1.9。", "1.9 is not larger than 1.11.", "1.11 比 1.9 大。", "1.9 is smaller than 1.11.", "",
])
def test_choice_rejects_restatements_hedges_negations_and_echoes(answer):
    assert not grade(answer, CMP, Q_CMP), answer


def test_choice_direction_comes_from_the_question():
    spec = {"type": "choice", "value": "3.14", "options": ["3.14", "3.2"]}
    question = "3.14 和 3.2 哪个小？"
    assert grade("3.14 更小。", spec, question) and grade("3.2 比 3.14 大。", spec, question)
    assert not grade("3.2 更小。", spec, question) and not grade("3.14 比 3.2 大。", spec, question)


@pytest.mark.parametrize("answer, spec, ok", [
    ("法国的首都不是巴黎，而是里昂。", {"type": "contains", "any": ["巴黎"]}, False),
    ("Not Rome; the capital is Milan.", {"type": "contains", "any": ["Rome"]}, False),
    ("K2 is higher than Everest.", {"type": "contains", "any": ["Everest"]}, False),
    ("Everest is higher than K2.", {"type": "contains", "any": ["Everest"]}, True),
    ("是巴黎而不是里昂。", {"type": "contains", "any": ["巴黎"]}, True),
    ("巴黎不是首都。", {"type": "contains", "any": ["巴黎"]}, False),
    ("There's no doubt it's Rome.", {"type": "contains", "any": ["Rome"]}, True),
    ("It is not William Shakespeare.", {"type": "contains", "any": ["Shakespeare"]}, False),
    ("星期四或星期五", {"type": "contains", "any": ["星期五"]}, False),
    ("Thursday or Friday.", {"type": "contains", "any": ["Thursday"]}, False),
    ("It will be Thursday.", {"type": "contains", "any": ["Thursday"]}, True),
    ("I'd rather have tea.", {"type": "contains", "any": ["tea"]}, True),
    ("I went instead.", {"type": "contains", "any": ["tea"]}, False),
    ("Error 1127", {"type": "contains", "any": ["112"]}, False),
    ("Call 112.", {"type": "contains", "any": ["112"]}, True),
    ("10", {"type": "contains", "any": ["1"]}, False),
    ("1.5", {"type": "contains", "any": ["1"]}, False),
    ("我是AI助手，不是甄嬛", {"type": "contains", "any": ["甄嬛"]}, False),
    ("NaCl2", {"type": "regex", "pattern": "NaCl(?![A-Za-z0-9₂])"}, False),
    ("The answer is not yes.", {"type": "regex", "pattern": "yes", "ignore_case": True}, False),
])
def test_contains_and_regex_need_an_assertion(answer, spec, ok):
    assert grade(answer, spec) is ok, answer


@pytest.mark.parametrize("answer, value, ok", [
    ("85 (38+47)", 85, True), ("38 + 47 = 85", 85, True), ("366 days (365 in a common year)", 366, True),
    ("minus five", -5, True), ("负五", -5, True), ("十二", 12, True), ("1,000 metres", 1000, True),
    ("1.5万", 15000, True), ("three hundred sixty-six", 366, True), ("It is -5 degrees.", -5, True),
    ("1 km = 1000 m", 1000, True), ("2.5 千克", 2.5, True), ("The answer is 42, not 41.", 42, True),
    ("The answer is not 42.", 42, False), ("41 or 42", 42, False), ("41-42", 42, False),
    ("It went from 42 to 50.", 42, False), ("大约 41 到 42 之间", 42, False),
])
def test_number_reads_what_the_answer_concludes(answer, value, ok):
    assert grade(answer, {"type": "number", "value": value}) is ok, answer


def test_an_echo_of_the_question_scores_nothing():
    question = '句子：“这本书售价 45 元，比上周便宜了 5 元。”这本书现在卖多少元？只回答数字。'
    spec = {"type": "number", "value": 5}
    assert grade(question, {"type": "number", "value": 5})  # without the question: the last number
    assert not grade(question, spec, question)
    assert grade("现在卖 45 元。", {"type": "number", "value": 45}, question)
    assert not grade("这本书售价 45 元，比上周便宜了 5 元。", {"type": "number", "value": 5}, question)
    assert grade("**45**", {"type": "number", "value": 45}, question)  # emphasis is no multiplication
    # a sentence is cut at . ? ! and quotes, not at ";": one clause of it, restated, is an answer
    question = 'Sentence: "In 2020 the town had 15,000 residents; today it has 18,200." How many today?'
    assert grade("Today it has 18,200.", {"type": "number", "value": 18200}, question)
    assert not grade(question, {"type": "number", "value": 18200}, question)
