"""Persona suite: did the model learn the character? Questions about facts the training data
teaches and the system prompt does not state, asked under the persona system prompt; an
answer passes only if it asserts the fact (an echo, a denial or a hedge does not:
checkers.py). The bundled sets and the held-out ones are described in docs/EVALUATION.md."""

from __future__ import annotations

from .checkers import load_probes
from .common import Context, SuiteResult, probe_suite


def run(engine, models: list[str], ctx: Context, probes_path: str) -> list[SuiteResult]:
    return [probe_suite(engine, models, ctx, load_probes(probes_path), "persona", ctx.system_prompt,
                        f"persona probes ({probes_path}) asked under the persona system prompt")]
