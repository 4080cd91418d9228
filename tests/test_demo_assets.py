"""The bundled demo persona data set and its probes are well formed and consistent, and every
persona probe set's graders refuse its wrong answers (echoes, denials, negations, hedges)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.evaluate.checkers import grade, load_probes, self_test, self_test_counts

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "tunelab" / "assets" / "demo"
HELD_OUT = ROOT / "src" / "tunelab" / "assets" / "probes" / "heldout"
PERSONA_SETS = {"demo": DEMO / "persona_probes.yaml", "demo_heldout": HELD_OUT / "demo.yaml",
                "huanhuan": ROOT / "examples" / "huanhuan_probes.yaml", "huanhuan_heldout": HELD_OUT / "huanhuan.yaml"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = (DEMO / "persona.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def probes() -> list[dict]:
    return yaml.safe_load((DEMO / "persona_probes.yaml").read_text(encoding="utf-8"))["probes"]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def test_rows_are_alpaca_with_text(rows: list[dict]) -> None:
    assert 200 <= len(rows) <= 260
    for number, row in enumerate(rows, start=1):
        assert set(row) == {"instruction", "input", "output"}, f"persona.jsonl:{number}"
        assert isinstance(row["input"], str), f"persona.jsonl:{number}"
        assert row["instruction"].strip() and row["output"].strip(), f"persona.jsonl:{number}"


def test_answers_are_short(rows: list[dict]) -> None:
    words = [len(row["output"].split()) for row in rows]
    assert sum(words) / len(words) < 40
    assert max(words) <= 60


def test_no_duplicate_instructions(rows: list[dict]) -> None:
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        key = normalise(row["instruction"])
        assert key not in seen, f"persona.jsonl:{number} repeats line {seen.get(key)}"
        seen[key] = number


def test_system_prompt_is_one_line() -> None:
    text = (DEMO / "system_prompt.txt").read_text(encoding="utf-8").strip()
    assert text and "\n" not in text


def test_probes_are_held_out(rows: list[dict], probes: list[dict]) -> None:
    assert len(probes) >= 30  # enough that a real gain is detectable by the sign test
    trained = {normalise(row["instruction"]) for row in rows} | {normalise(row["input"]) for row in rows}
    ids = [probe["id"] for probe in probes]
    assert len(ids) == len(set(ids))
    for probe in probes:
        assert normalise(probe["question"]) not in trained, probe["id"]


def test_each_reference_passes_its_own_check(probes: list[dict]) -> None:
    for probe in probes:
        check = probe["check"]
        assert check["type"] == "contains" and check["any"], probe["id"]
        assert grade(probe["reference"], check, probe["question"]), probe["id"]


def _held_out_probes() -> list[dict]:
    return yaml.safe_load((HELD_OUT / "demo.yaml").read_text(encoding="utf-8"))["probes"]


def test_probe_facts_are_taught_and_not_in_the_system_prompt(rows: list[dict], probes: list[dict]) -> None:
    # A probe is only fair if some training answer asserts one of its keywords; it measures the
    # training only if the system prompt does not already state it.
    prompt = (DEMO / "system_prompt.txt").read_text(encoding="utf-8")
    for probe in probes + _held_out_probes():
        check = {k: v for k, v in probe["check"].items() if k != "none"}
        assert any(grade(row["output"], check) for row in rows), probe["id"]
        if probe.get("category") != "identity":
            assert not grade(prompt, check), probe["id"]


def test_held_out_probes_are_listed_by_no_example_and_ask_new_questions(rows, probes) -> None:
    experiments = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in (ROOT / "examples").glob("*.yaml")]
    listed = [str((e.get("eval") or {}).get("persona_probes", "")) for e in experiments if "eval" in e]
    assert listed and not [path for path in listed if "heldout" in path]
    asked = {normalise(p["question"]) for p in probes}
    trained = {normalise(row["instruction"]) for row in rows}
    for probe in _held_out_probes():
        assert normalise(probe["question"]) not in asked | trained, probe["id"]
    huanhuan = {p.question for p in load_probes(PERSONA_SETS["huanhuan"])}
    assert not huanhuan & {p.question for p in load_probes(PERSONA_SETS["huanhuan_heldout"])}


@pytest.mark.parametrize("name", PERSONA_SETS)
def test_persona_graders_refuse_every_wrong_answer(name: str) -> None:
    persona = load_probes(PERSONA_SETS[name])
    counts = self_test_counts(persona)
    print(f"{name}: wrong accepted {counts['wrong_accepted']}/{counts['wrong']}, "
          f"right accepted {counts['right_accepted']}/{counts['right']}")
    assert counts["wrong_accepted"] == 0, self_test(persona)
    assert counts["right_accepted"] >= 0.95 * counts["right"], self_test(persona)
    assert len(persona) >= (10 if "heldout" in name else 30 if name == "demo" else 40)
    assert all(len(p.wrong) >= 5 and p.right for p in persona)


def test_denials_fail_the_identity_probes() -> None:
    who = {p.id: p for p in load_probes(PERSONA_SETS["huanhuan"])}["who"]
    assert who.grade("我是甄嬛，家父是大理寺少卿甄远道。")
    for denial in ("我是AI助手，不是甄嬛", "我不是甄嬛。", "你是谁", "你问我是谁？我是谁呢。"):
        assert not who.grade(denial), denial
    name = {p.id: p for p in load_probes(PERSONA_SETS["demo"])}["name"]
    assert name.grade("Bram Tolliver, friend.") and not name.grade("I'm an AI assistant, not Bram Tolliver.")
