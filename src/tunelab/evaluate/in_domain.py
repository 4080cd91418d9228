"""In-domain suite: the held-out split of the training data.

Per model: the mean loss per supervised token (and perplexity) under teacher forcing, and
generated answers scored against the references with character-level F1, ROUGE-L (both
work for Chinese) and exact match.
"""

from __future__ import annotations

import math

from ..data import Example, Rendered
from .common import Context, SuiteResult, ask_all, score_rows
from .metrics import char_f1, exact_match, rouge_l


def run(engine, models: list[str], ctx: Context, examples: list[Example], rows: list[Rendered]) -> list[SuiteResult]:
    pairs = ctx.subset(list(zip(examples, rows)))
    examples, rows = [e for e, _ in pairs], [r for _, r in pairs]
    ids = [f"{i:04d}" for i in range(len(examples))]
    results = []
    if rows:
        losses, summary = {}, {}
        for model in models:
            scored = score_rows(engine, rows, adapter=model, batch_size=ctx.batch_size)
            losses[model] = {i: nll / n for i, (nll, n) in zip(ids, scored)}
            mean = sum(nll for nll, _ in scored) / max(1, sum(n for _, n in scored))
            summary[model] = {"token_loss": mean, "perplexity": math.exp(min(mean, 50))}
        results.append(SuiteResult("in_domain_loss", losses, "loss", False,
                                   "held-out rows: mean loss per supervised token (lower is better)",
                                   summary=summary))
    prompts = [e.messages[:-1] for e in examples]
    references = [e.messages[-1]["content"] for e in examples]
    answers = ask_all(engine, models, prompts, ctx, "in-domain")
    for metric, fn in (("char_f1", char_f1), ("rouge_l", rouge_l), ("exact_match", exact_match)):
        scores = {m: {i: fn(a, r) for i, a, r in zip(ids, answers[m], references)} for m in models}
        rows_out = []
        if metric == "rouge_l":  # one side-by-side table for the three metrics
            rows_out = [{"suite": "in_domain", "id": i, "question": p[-1]["content"], "reference": r,
                         "answers": {m: answers[m][k] for m in models},
                         "scores": {m: scores[m][i] for m in models}}
                        for k, (i, p, r) in enumerate(zip(ids, prompts, references))]
        results.append(SuiteResult(f"in_domain_{metric}", scores, metric, True,
                                   f"held-out rows: generated answer vs reference, {metric}", rows_out))
    return results
