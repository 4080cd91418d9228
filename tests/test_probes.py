"""The bundled general-ability probe set is valid, balanced and self-tested."""

from collections import Counter

import pytest

from tunelab.evaluate.checkers import bundled_probes_path, load_probes, self_test

PROBES = load_probes()  # validates every item, unique ids included
# Answers no general-ability item may accept: silence, a refusal, and in-character
# persona replies (the failure the set exists to catch).
NEVER_RIGHT = [
    "", "我不知道。", "I don't know.", "I'm not sure.",
    "我是甄嬛，家父是大理寺少卿甄远道。", "Well now, friend. Steady as the light.",
]


def test_bundled_file_is_found_and_loads():
    assert bundled_probes_path().name == "general.yaml"
    assert PROBES == load_probes(bundled_probes_path())


def test_size_languages_and_categories():
    assert len(PROBES) >= 200
    by_lang = Counter(p.lang for p in PROBES)
    assert set(by_lang) == {"zh", "en"}
    assert abs(by_lang["zh"] - by_lang["en"]) <= len(PROBES) * 0.1  # roughly half each
    categories = {p.category for p in PROBES}
    assert categories >= {"number_compare", "arithmetic", "unit_conversion", "number_extraction",
                          "facts", "format_one_word", "format_json", "reasoning"}
    for lang in ("zh", "en"):
        assert {p.category for p in PROBES if p.lang == lang} == categories


def test_ids_unique():
    ids = [p.id for p in PROBES]
    assert len(ids) == len(set(ids))


def test_reference_tutorial_question_is_included():
    questions = {p.question for p in PROBES}
    assert "1.11 和 1.9 那个大" in questions and "1.11 和 1.9 哪个大？" in questions


def test_every_item_has_reference_and_wrong_answers():
    assert [p.id for p in PROBES if p.reference is None or not p.wrong] == []


def test_self_test_passes():
    assert self_test(PROBES) == []


@pytest.mark.parametrize("answer", NEVER_RIGHT)
def test_no_item_accepts_non_answers(answer):
    assert [p.id for p in PROBES if p.grade(answer)] == []


def test_other_items_references_are_rejected():
    # An item must reject the reference of every other item of its language and category
    # that expects something else (a different check): guards against checks so loose
    # they accept any on-topic answer.
    leaks = [
        f"{probe.id} accepts {other.id}'s reference {other.reference!r}"
        for probe in PROBES for other in PROBES
        if (other.lang, other.category) == (probe.lang, probe.category)
        and other.check != probe.check and probe.grade(other.reference)
    ]
    assert leaks == []
