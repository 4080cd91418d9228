"""User benchmarks: multiple-choice CSV (C-Eval / CMMLU / MMLU layout) and QA JSONL.

Multiple choice is scored without generation: each option's letter is scored by its
log-likelihood as the assistant's reply, zero- or few-shot (the first `shots` rows of the
file become earlier turns and are not scored). QA rows (`question`, `answer`) are answered
greedily and graded by the chosen checker.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..data import IGNORE, Rendered
from .checkers import grade
from .common import Context, SuiteResult, ask_all, score_rows, with_system
from .metrics import char_f1, exact_match

LETTERS = "ABCD"


@dataclass
class Benchmark:
    path: str
    """A .csv (question, A, B, C, D, answer) or .jsonl (question, answer) file."""
    shots: int = 0
    """Multiple choice: solved examples shown before each question (taken from the file's start)."""
    checker: Literal["contains", "number", "exact", "char_f1"] = "contains"
    """QA: how an answer is graded against the reference: `contains` (the answer asserts the
    reference as whole words, not negated or hedged), `number` (concludes its value), `exact`
    or `char_f1`. Text copied from the question counts for nothing (checkers.py)."""


def read_mc(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    need = {"question", "A", "B", "C", "D", "answer"}
    for n, row in enumerate(rows, start=2):
        missing = need - {k for k, v in row.items() if v is not None}
        if missing:
            raise ValueError(f"{path}:{n}: missing column(s) {sorted(missing)}; expected {sorted(need)}")
        if row["answer"].strip().upper() not in LETTERS:
            raise ValueError(f"{path}:{n}: answer must be one of A-D, got {row['answer']!r}")
    return rows


def mc_question(row: dict) -> str:
    options = "\n".join(f"{letter}. {row[letter]}" for letter in LETTERS)
    return f"{row['question']}\n{options}\nAnswer with the letter of the correct option."


def multiple_choice(engine, models: list[str], ctx: Context, bench: Benchmark) -> SuiteResult:
    rows = read_mc(Path(bench.path))
    shots, rows = rows[: bench.shots], rows[bench.shots:]
    rows = ctx.subset(rows)
    history = []
    for shot in shots:
        history += [{"role": "user", "content": mc_question(shot)},
                    {"role": "assistant", "content": shot["answer"].strip().upper()}]
    fmt = engine.format
    candidates = []  # four rows per question: the prompt, then one letter as the reply
    for row in rows:
        prompt = fmt.prompt_ids(history + [{"role": "user", "content": mc_question(row)}])
        for letter in LETTERS:
            reply = fmt.encode(letter)
            candidates.append(Rendered(prompt + reply, [IGNORE] * len(prompt) + reply))
    name = f"mc_{Path(bench.path).stem}_{bench.shots}shot"
    ids = [f"{i:04d}" for i in range(len(rows))]
    scores = {}
    for model in models:
        scored = score_rows(engine, candidates, adapter=model, batch_size=ctx.batch_size)
        picks = [min(range(4), key=lambda k: scored[4 * q + k][0]) for q in range(len(rows))]
        scores[model] = {i: float(LETTERS[p] == row["answer"].strip().upper())
                         for i, p, row in zip(ids, picks, rows)}
    return SuiteResult(name, scores, "accuracy", True,
                       f"{bench.path}: multiple choice by option log-likelihood, {bench.shots}-shot")


def qa(engine, models: list[str], ctx: Context, bench: Benchmark) -> SuiteResult:
    path = Path(bench.path)
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = ctx.subset(items)
    conversations = [with_system(None, item["question"]) for item in items]
    answers = ask_all(engine, models, conversations, ctx, path.stem)
    ids = [f"{i:04d}" for i in range(len(items))]

    def score(answer: str, item: dict) -> float:
        # what the answer copies from the question counts for nothing
        reference, question = item["answer"], item["question"]
        if bench.checker == "number":
            return float(grade(answer, {"type": "number", "value": float(reference)}, question))
        if bench.checker == "exact":
            return exact_match(answer, str(reference))
        if bench.checker == "char_f1":
            return char_f1(answer, str(reference))
        # whole words: reference "1" is not in "10"
        return float(grade(answer, {"type": "contains", "any": [str(reference)], "whole_word": True}, question))

    scores = {m: {i: score(a, item) for i, a, item in zip(ids, answers[m], items)} for m in models}
    rows = [{"suite": f"qa_{path.stem}", "id": i, "question": item["question"], "reference": str(item["answer"]),
             "answers": {m: answers[m][k] for m in models}, "scores": {m: scores[m][i] for m in models}}
            for k, (i, item) in enumerate(zip(ids, items))]
    return SuiteResult(f"qa_{path.stem}", scores, "accuracy" if bench.checker != "char_f1" else "char_f1",
                       True, f"{bench.path}: QA graded by {bench.checker}", rows)


def run(engine, models: list[str], ctx: Context, benchmarks: list[Benchmark]) -> list[SuiteResult]:
    return [multiple_choice(engine, models, ctx, b) if b.path.endswith(".csv") else qa(engine, models, ctx, b)
            for b in benchmarks]
