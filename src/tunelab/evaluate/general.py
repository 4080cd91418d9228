"""General-ability suite: the bundled probe set (number comparison, arithmetic, units,
facts, format following; Chinese and English), auto-graded.

It is asked twice: plainly, and under the persona system prompt. The reference asked
`1.11 和 1.9 那个大` under the persona prompt, and the tuned model answered in character
instead of comparing the numbers: that is the loss this suite measures.
"""

from __future__ import annotations

from typing import Optional

from .checkers import load_probes
from .common import Context, SuiteResult, probe_suite


def run(engine, models: list[str], ctx: Context, probes_path: Optional[str] = None) -> list[SuiteResult]:
    probes = load_probes(probes_path)
    results = [probe_suite(engine, models, ctx, probes, "general", None,
                           "general-ability probes, no system prompt")]
    if ctx.system_prompt:
        results.append(probe_suite(engine, models, ctx, probes, "general_persona", ctx.system_prompt,
                                   "general-ability probes asked under the persona system prompt"))
    return results
