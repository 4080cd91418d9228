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
    ("42，因为 17 加 25", "last", False),
    ("42，因为 17 加 25", "first", True),
    ("17 + 25 = 42", "any", True),
    ("42 or 42.0", "only", True),
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
    assert grade("Marshmallow", {"type": "contains", "any": ["Mars"]})


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
