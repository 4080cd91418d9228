"""What every suite shares: the result of one suite, and asking every model the same questions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..config import GenerationConfig
from ..data import IGNORE
from .checkers import score_answers


@dataclass
class SuiteResult:
    """Per-item scores of every model on one suite, plus what the report shows of it."""

    name: str
    scores: dict[str, dict[str, float]]
    """model -> item id -> score (0/1 for probes, a float for ROUGE-L or a loss)."""
    metric: str = "accuracy"
    higher_is_better: bool = True
    description: str = ""
    answers: list[dict] = field(default_factory=list)
    """Side-by-side rows: {suite, id, question, reference?, answers: {model: text}, scores}."""
    groups: Optional[dict[str, str]] = None
    """item id -> group (a probe's category), for per-group means."""
    summary: dict[str, dict] = field(default_factory=dict)
    """model -> extra figures (e.g. perplexity) shown next to the mean."""


def merge_results(parts: list[list[SuiteResult]], models: list[str]) -> list[SuiteResult]:
    """One result per suite from several engines' results on the same items, each engine
    having scored some of `models` (runs that cannot share one base in memory); every table
    keyed by model (scores, summary, each answer row's answers and scores) in `models`' order."""
    merged: dict[str, SuiteResult] = {}
    for part in parts:
        for result in part:
            into = merged.get(result.name)
            if into is None:
                merged[result.name] = replace(result, scores=dict(result.scores), summary=dict(result.summary),
                                              answers=[dict(row) for row in result.answers])
                continue
            first_items = set(next(iter(into.scores.values()), {}))
            for model, items in result.scores.items():
                if first_items and set(items) != first_items:
                    raise RuntimeError(f"suite {result.name}: {model} was scored on other items than the "
                                       f"models before it, so the two cannot be compared")
            into.scores.update(result.scores)
            into.summary.update(result.summary)
            rows = {(row["suite"], row["id"]): row for row in into.answers}
            for row in result.answers:
                held = rows.get((row["suite"], row["id"]))
                if held is None:
                    into.answers.append(dict(row))
                    continue
                for key, value in row.items():
                    if isinstance(value, dict) and isinstance(held.get(key), dict):
                        held[key] = {**held[key], **value}
    for result in merged.values():
        result.scores = in_order(result.scores, models)
        result.summary = in_order(result.summary, models)
        for row in result.answers:
            for key, value in row.items():
                if isinstance(value, dict):
                    row[key] = in_order(value, models)
    return list(merged.values())


def in_order(table: dict, models: list[str]) -> dict:
    """`table` with the models' keys first, in `models`' order, then any other key as it was."""
    return {**{m: table[m] for m in models if m in table}, **{k: v for k, v in table.items() if k not in models}}


@dataclass
class Context:
    """Settings every suite may read."""

    gen: GenerationConfig
    system_prompt: Optional[str] = None
    batch_size: int = 16
    limit: Optional[int] = None
    """Score at most N items of each suite, spread evenly over it (quick runs)."""

    def subset(self, items: list) -> list:
        """At most `limit` items, evenly spaced, so every category of a sorted file keeps its share."""
        if not self.limit or len(items) <= self.limit:
            return items
        return [items[i * len(items) // self.limit] for i in range(self.limit)]


def ask_all(engine, models: list[str], conversations: list[list[dict]], ctx: Context,
            what: str) -> dict[str, list[str]]:
    """Each model's answers to the same conversations, greedy unless ctx.gen says otherwise."""
    answers = {}
    for model in models:
        print(f"  {what}: {len(conversations)} questions to {model}")
        answers[model] = engine.generate(conversations, ctx.gen, ctx.batch_size, progress=True, adapter=model)
    return answers


def with_system(system: Optional[str], question: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}]


def probe_suite(engine, models: list[str], ctx: Context, probes: list, name: str,
                system: Optional[str], description: str) -> SuiteResult:
    """Ask every model each probe's question (under `system`) and grade the answers."""
    probes = ctx.subset(probes)
    conversations = [with_system(system, p.question) for p in probes]
    answers = ask_all(engine, models, conversations, ctx, name)
    scores = {m: score_answers(probes, {p.id: a for p, a in zip(probes, answers[m])}) for m in models}
    rows = [{"suite": name, "id": p.id, "question": p.question, "reference": p.reference,
             "answers": {m: answers[m][i] for m in models},
             "scores": {m: scores[m][p.id] for m in models}} for i, p in enumerate(probes)]
    return SuiteResult(name, scores, "accuracy", True, description, rows,
                       groups={p.id: f"{p.lang}/{p.category}" for p in probes})


def score_rows(engine, rows: list, adapter: str, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, supervised token count) of each rendered row under
    `adapter`, by teacher forcing: the in-domain loss and multiple-choice scores."""
    # torch and the engine: imported here, as this module is read when `tunelab --help` runs
    import torch
    import torch.nn.functional as F

    from ..generate import left_pad

    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            prompts = [rows[i].input_ids for i in batch]
            labels, _ = left_pad([rows[i].labels for i in batch], IGNORE)
            # Logits only from the position before each row's first supervised token on (the
            # LM head is the costliest layer of a small model); rows are right-aligned.
            starts = [first_supervised(rows[i].labels) for i in batch]
            keep = min(labels.shape[1], max(len(p) - s + 1 for p, s in zip(prompts, starts)))
            logits = engine.last_logits(prompts, keep, adapter, shared_at_most=min(starts) - 1)
            target = labels[:, labels.shape[1] - keep + 1:].to(logits.device)
            picked = torch.cat([  # a few rows at a time: the full-vocabulary log-probabilities are large
                F.log_softmax(chunk.float(), dim=-1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                for chunk, t in zip(logits[:, :-1].split(8), target.split(8))])
            valid = target != IGNORE
            nll = -(picked * valid).sum(-1)
            for row, i in enumerate(batch):
                out[i] = (nll[row].item(), int(valid[row].sum().item()))
    return out


def first_supervised(labels: list[int]) -> int:
    """Index of the first supervised label (len(labels) when there is none)."""
    return next((n for n, label in enumerate(labels) if label != IGNORE), len(labels))
