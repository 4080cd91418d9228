"""The bundled general-ability probe set is valid, balanced and self-tested: every item's
grader refuses every wrong answer the file lists (echo, reversed restatement, negation,
hedge, both options) and the question echoed, and accepts >= 95% of its right answers."""

import random
from collections import Counter

import pytest

from tunelab.evaluate.checkers import bundled_probes_path, load_probes, self_test, self_test_counts

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


def test_every_item_has_right_and_wrong_answers_in_several_styles():
    assert [p.id for p in PROBES if p.reference is None or len(p.right) < 2 or len(p.wrong) < 3] == []
    assert sum(len(p.right) + 1 for p in PROBES) >= 5 * len(PROBES)
    assert sum(len(p.wrong) for p in PROBES) >= 5 * len(PROBES)


def test_graders_refuse_every_wrong_answer_and_accept_right_ones():
    counts = self_test_counts(PROBES)
    print(f"general: wrong accepted {counts['wrong_accepted']}/{counts['wrong']}, "
          f"right accepted {counts['right_accepted']}/{counts['right']}")
    problems = self_test(PROBES)
    assert counts["wrong_accepted"] == 0, [p for p in problems if "accepts" in p]
    assert counts["right_accepted"] >= 0.95 * counts["right"], [p for p in problems if "rejects" in p]


def _soup(rng: random.Random, digits: bool) -> str:
    """What random weights write: tokens of a mixed vocabulary in no order."""
    pieces = list("的一是了我不人在他有这上们来到时大地为子中你说生国年着就那要她出也得里后自以会家可下而过天去能对小多然"
                  "于心学么之都好看起发当没成只如事还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长"
                  "儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感") + \
        ["the", "of", "ing", "and", "is", "er", "ation", "ly", "ocy", "Ġ", ".", ",", "!", "?", "。", "，", " ", " ",
         "{", "}", '"', ":", "-", "+", "="] + (list("0123579") if digits else [])
    return "".join(rng.choice(pieces) for _ in range(rng.randint(3, 40)))


def test_gibberish_scores_about_nothing():
    rng = random.Random(0)
    # 200 answer sets: each item gets its own soup, as a model gives each question its own answer
    without_digits = [p.id for _ in range(200) for p in PROBES if p.grade(_soup(rng, False))]
    assert len(without_digits) <= 2, without_digits  # of 49,200 answers
    # A soup with a digit every ~25 tokens (far more than random weights over a real vocabulary
    # write) passes under 0.5 of the 246 items per answer set: a lone glued digit is no answer.
    with_digits = sum(p.grade(_soup(rng, True)) for _ in range(200) for p in PROBES)
    print(f"gibberish: {len(without_digits)} and {with_digits} of {200 * len(PROBES)} answers accepted")
    assert with_digits / 200 < 0.5


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


def test_no_item_accepts_its_question_echoed():
    from tunelab.evaluate.checkers import grade

    assert [p.id for p in PROBES if p.grade(p.question)] == []
    # Graded blind (no question), the question's own text still passes 18 items, e.g. a number
    # extraction whose answer is the sentence's last number: the echo rule is what refuses them.
    assert len([p.id for p in PROBES if grade(p.question, p.check)]) >= 10
