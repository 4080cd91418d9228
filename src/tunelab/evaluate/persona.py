"""Persona suite: did the model learn the character? Held-out questions with required
keywords (`你是谁` -> contains 甄嬛), asked under the persona system prompt."""

from __future__ import annotations

from .checkers import load_probes
from .common import Context, SuiteResult, probe_suite


def run(engine, models: list[str], ctx: Context, probes_path: str) -> list[SuiteResult]:
    return [probe_suite(engine, models, ctx, load_probes(probes_path), "persona", ctx.system_prompt,
                        f"persona probes ({probes_path}) asked under the persona system prompt")]
