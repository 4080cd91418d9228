"""The bundled replay prompts: enough of them, both languages, original, and disjoint from
every evaluation probe (exactly, after normalization, and as near-duplicates)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import yaml

from tunelab.data.replay import PROMPTS, load_prompts

ROOT = Path(__file__).resolve().parent.parent
PROBE_FILES = ([ROOT / "src/tunelab/assets/probes/general.yaml", ROOT / "src/tunelab/assets/demo/persona_probes.yaml",
                ROOT / "examples/huanhuan_probes.yaml"]
               + sorted((ROOT / "src/tunelab/assets/probes/heldout").glob("*.yaml")))


def normalize(text: str) -> str:
    """Case, width, punctuation and spacing folded away."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", "", text)


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", unicodedata.normalize("NFKC", text)))


def trigrams(text: str) -> set[str]:
    t = normalize(text)
    return {t[i:i + 3] for i in range(len(t) - 2)} or {t}


def near_duplicate(a: str, b: str) -> bool:
    """The same text up to normalization, one inside the other, most character trigrams
    shared, or the same two or more numbers (a probe's arithmetic or comparison re-asked)."""
    na, nb = normalize(a), normalize(b)
    if na == nb or (min(len(na), len(nb)) >= 8 and (na in nb or nb in na)):
        return True
    ta, tb = trigrams(a), trigrams(b)
    if len(ta & tb) / len(ta | tb) > 0.5:
        return True
    shared = numbers(a) & numbers(b)
    return len(shared) >= 2 and shared == numbers(a)


def probe_questions() -> list[str]:
    questions = []
    for path in PROBE_FILES:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        for item in spec.get("items") or spec.get("probes") or []:
            questions.append(item["question"])
    return questions


def test_the_prompt_set_is_large_bilingual_and_unique():
    prompts = load_prompts()
    assert len(prompts) >= 500
    langs = [p["lang"] for p in prompts]
    assert langs.count("en") >= 250 and langs.count("zh") >= 250
    assert {p["lang"] for p in load_prompts(10)} == {"en", "zh"}  # any prefix holds both
    assert len({normalize(p["prompt"]) for p in prompts}) == len(prompts)
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert PROMPTS.suffix == ".jsonl"


def test_no_prompt_is_or_nearly_is_an_evaluation_probe():
    questions = probe_questions()
    assert len(questions) > 300  # every probe file was read
    clashes = [(p["id"], q) for p in load_prompts() for q in questions if near_duplicate(p["prompt"], q)]
    assert clashes == []


def test_the_near_duplicate_check_catches_what_it_should():
    assert near_duplicate("1.11 和 1.9 哪个大？", "1.11和1.9哪个大")
    assert near_duplicate("Which is larger, 1.11 or 1.9?", "Compare 1.9 and 1.11 for me.")
    assert near_duplicate("What is the capital of Spain?", "what is the capital of spain")
    assert near_duplicate("Tell me: what is the capital of Spain? Thanks", "What is the capital of Spain?")
    assert not near_duplicate("Explain photosynthesis in simple terms.", "What is the capital of Spain?")
