"""The bundled demo persona data set and its probes are well formed and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

DEMO = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets" / "demo"


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
    assert 12 <= len(probes) <= 20
    trained = {normalise(row["instruction"]) for row in rows} | {normalise(row["input"]) for row in rows}
    ids = [probe["id"] for probe in probes]
    assert len(ids) == len(set(ids))
    for probe in probes:
        assert normalise(probe["question"]) not in trained, probe["id"]


def test_each_reference_passes_its_own_check(probes: list[dict]) -> None:
    for probe in probes:
        check = probe["check"]
        assert check["type"] == "contains" and check["any"], probe["id"]
        reference = probe["reference"].lower()
        assert any(str(word).lower() in reference for word in check["any"]), probe["id"]


def test_probe_facts_are_taught(rows: list[dict], probes: list[dict]) -> None:
    # A probe is only fair if some training answer contains one of its keywords.
    answers = " ".join(row["output"] for row in rows).lower()
    for probe in probes:
        assert any(str(word).lower() in answers for word in probe["check"]["any"]), probe["id"]
