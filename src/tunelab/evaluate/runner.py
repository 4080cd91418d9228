"""`tunelab eval`: score a base model and any number of runs on the same items, one process.

The base stays in memory once; each run's adapter is switched in by name. Every suite
gives per-item scores; `compare` turns them into deltas vs the base with bootstrap
intervals and flips; `report` writes results.json, report.md and report.html.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, DataConfig, GenerationConfig, ModelConfig, from_dict
from ..runs import RunDir, check_writable
from . import benchmarks as benchmarks_suite
from . import general, in_domain, persona
from .benchmarks import Benchmark
from .common import Context, SuiteResult
from .compare import compare_suite

Suite = Literal["in_domain", "persona", "general", "benchmarks"]
BASE = "base"


def evaluate(runs: list[str] = [], model: Optional[ModelConfig] = None,
             suites: list[Suite] = ["in_domain", "persona", "general"],
             persona_probes: Optional[str] = None, general_probes: Optional[str] = None,
             benchmarks: list[Benchmark] = [], data: Optional[DataConfig] = None,
             system_prompt: Optional[str] = None,
             gen: GenerationConfig = GenerationConfig(max_new_tokens=128),
             batch_size: int = 128, limit: Optional[int] = None, out: str = "eval",
             title: str = "tunelab evaluation", extra: Optional[dict] = None) -> dict:
    """Evaluate the base model and each run on the chosen suites; write a report.

    Args:
        runs: run directories (their adapters share one base in memory).
        model: the base model (default: the first run's base).
        suites: which suites to run; `persona` needs --persona_probes, `benchmarks` --benchmarks.
        persona_probes: a YAML probe file for the persona suite.
        general_probes: a YAML probe file replacing the bundled general-ability set.
        benchmarks: multiple-choice CSV / QA JSONL files (see `Benchmark`).
        data: the data set whose held-out split is the in-domain suite (default: the first run's).
        system_prompt: the persona system prompt (default: the first run's data.system_prompt).
        gen: decoding options; greedy by default, so a rerun gives the same answers.
        batch_size: prompts per generation (and scoring) batch. Large batches pay: a CPU decoding
            step of a 135M model costs ~150 ms for 16 rows and ~440 ms for 128; a GPU step of a
            1.5B model ~4 ms for 1 row and ~6 ms for 256 (docs/PERFORMANCE.md).
        limit: score at most N items of each suite, evenly spaced over it (quicker, wider intervals).
        out: where results.json, report.md and report.html are written.
        title: the report's title.
        extra: more report fields (e.g. the experiment's methods table), merged in as they are.
    """
    from ..generate import Engine
    from ..report import write_report

    started = time.perf_counter()
    check_writable(Path(out), "--out")  # before the models load, not after the work
    names = unique_names(runs)
    run_configs = {name: RunDir(Path(r)).read_config() for name, r in names.items()}
    first = next(iter(run_configs.values()), {})
    if model is None and not runs:
        raise ConfigError("give runs to evaluate (--runs RUN ...) or a base model (--model.path ...)")
    if system_prompt is None:
        system_prompt = (first.get("data") or {}).get("system_prompt")
    engine = Engine.from_runs(names, model=model)
    models = [BASE] + list(names)
    ctx = Context(gen=gen, system_prompt=system_prompt, batch_size=batch_size, limit=limit)
    notes = [f"decoding: {'greedy' if gen.temperature == 0 else f'sampled, T={gen.temperature}, seed {gen.seed}'}, "
             f"max_new_tokens {gen.max_new_tokens}; bootstrap: 1000 paired resamples, seed 0"]
    if limit:
        notes.append(f"limit {limit}: at most {limit} items of each suite were scored, evenly spaced "
                     f"over it; intervals are wider than with every item")

    results: list[SuiteResult] = []
    for suite in suites:
        print(f"suite {suite}")
        if suite == "in_domain":
            held_out = held_out_split(data, first, engine)
            if held_out is None:
                notes.append("in_domain skipped: no held-out split (set data.val_size)")
                continue
            results += in_domain.run(engine, models, ctx, *held_out)
        elif suite == "persona":
            if not persona_probes:
                raise ConfigError("the persona suite needs --persona_probes FILE.yaml")
            results += persona.run(engine, models, ctx, persona_probes)
        elif suite == "general":
            results += general.run(engine, models, ctx, general_probes)
        elif suite == "benchmarks":
            results += benchmarks_suite.run(engine, models, ctx, benchmarks)

    report = {
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
        "base": BASE,
        "models": [{"name": BASE, "kind": "base", "summary": engine.model_path or ""}]
        + [{"name": n, "kind": "run", "run_dir": str(r),
            "summary": run_configs[n]["method"]["name"]} for n, r in names.items()],
        "suites": {},
        "answers": [row for r in results for row in r.answers],
        "curves": {n: loss_curves(RunDir(Path(r))) for n, r in names.items()},
        "configs": run_configs,
    }
    for r in results:
        comparison = compare_suite(r.scores, BASE, suite=r.name, metric=r.metric,
                                   higher_is_better=r.higher_is_better, groups=r.groups).to_dict()
        comparison["description"] = r.description
        if r.summary:
            comparison["description"] += "; " + ", ".join(
                f"{m}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items()) for m, s in r.summary.items())
        report["suites"][r.name] = comparison
    if extra:
        report.update(extra)
    report["notes"].append(f"evaluation wall time {time.perf_counter() - started:.0f} s")
    paths = write_report(report, out)
    print(f"report: {paths['html']}")
    return report


def unique_names(runs: list[str]) -> dict[str, str]:
    """Run directories by a short unique name (the directory's name)."""
    names: dict[str, str] = {}
    for run in runs:
        path = Path(run)
        name = path.name if path.name not in ("", ".", "..") else path.resolve().name
        while name in names or name == BASE:
            name = f"{path.resolve().parent.name}/{name}"
        names[name] = run
    return names


def held_out_split(data: Optional[DataConfig], first_run: dict, engine):
    """(examples, rendered rows) of the held-out split, drawn exactly as training drew it."""
    from ..data import load_examples, split

    if data is None:
        if not first_run.get("data"):
            return None
        data = from_dict(DataConfig, first_run["data"])
    if not data.val_size:
        return None
    loaded = load_examples(data.path, data.system_prompt, "skip", data.limit)
    _, val = split(loaded.examples, data.val_size, data.seed)
    rows = []
    for example in val:
        row = engine.format.render(example.messages, data.max_length, data.supervise, "prompt")
        rows.append(row)
    kept = [(e, r) for e, r in zip(val, rows) if r is not None]
    return [e for e, _ in kept], [r for _, r in kept]


def loss_curves(run: RunDir) -> dict:
    train, val = [], []
    if run.metrics.is_file():
        for line in run.metrics.read_text().splitlines():
            record = json.loads(line)
            train.append([record["step"], record["loss"]])
            if "val_loss" in record:
                val.append([record["step"], record["val_loss"]])
    return {"train": train, "val": val}
