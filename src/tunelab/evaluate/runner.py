"""`tunelab eval`: score a base model and any number of runs on the same items, one process.

The base stays in memory once; each run's adapter is switched in by name. Runs that cannot
share one base (IA3 beside LoRA; freeze and full, which replace the base's weights) are
scored on engines of their own, one after another (`engine_groups`), and their results
merged; the base is scored once, on the first. Every suite gives per-item scores;
`compare` turns them into deltas vs the base with paired tests (Holm-corrected over every
suite and run of the report), bootstrap intervals and flips; `report` writes results.json,
report.md and report.html. Runs are only compared on one held-out split:
`check_same_split` refuses runs trained on other data, seeds or splits.
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, DataConfig, GenerationConfig, ModelConfig, from_dict
from ..data import load_examples, split
from ..methods import get
from ..report import write_report
from ..runs import RunDir, check_writable, run_model_config
from . import benchmarks as benchmarks_suite
from . import general, in_domain, persona
from .benchmarks import Benchmark
from .common import Context, SuiteResult, merge_results
from .compare import ALPHA, compare_suite, holm_adjust

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
        runs: run directories (their adapters share one base in memory where their methods allow;
            the others are scored on engines of their own, in turn).
        model: the base model (default: the first run's base).
        suites: which suites to run; `persona` needs --persona_probes, `benchmarks` --benchmarks.
        persona_probes: a YAML probe file for the persona suite.
        general_probes: a YAML probe file replacing the bundled general-ability set.
        benchmarks: multiple-choice CSV / QA JSONL files (see `Benchmark`).
        data: the data set whose held-out split is the in-domain suite (default: the first run's).
        system_prompt: the persona system prompt (default: the first run's data.system_prompt).
        gen: decoding options; greedy by default, so a rerun gives the same answers.
        batch_size: prompts per generation (and scoring) batch. Large batches pay: a decoding
            step reads every weight once whatever the rows, so many rows cost little more than
            a few (docs/PERFORMANCE.md, "Figures the code refers to").
        limit: score at most N items of each suite, evenly spaced over it (quicker, wider intervals).
        out: where results.json, report.md and report.html are written.
        title: the report's title.
        extra: more report fields (e.g. the experiment's methods table), merged in as they are.
    """
    from ..generate import Engine  # torch at its top: imported here so `tunelab --help` stays fast (tests/test_cli.py)

    started = time.perf_counter()
    check_writable(Path(out), "--out")  # before the models load, not after the work
    names = unique_names(runs)
    run_configs = {name: RunDir(Path(r)).read_config() for name, r in names.items()}
    check_same_split(names, run_configs)
    first = next(iter(run_configs.values()), {})
    if model is None and not runs:
        raise ConfigError("give runs to evaluate (--runs RUN ...) or a base model (--model.path ...)")
    if "persona" in suites and not persona_probes:
        raise ConfigError("the persona suite needs --persona_probes FILE.yaml")
    if system_prompt is None:
        system_prompt = (first.get("data") or {}).get("system_prompt")
    if model is None:  # every engine loads the same base: the first run's (a moved base: a clear error)
        model = run_model_config(RunDir(Path(runs[0])), first)
    models = [BASE] + list(names)
    ctx = Context(gen=gen, system_prompt=system_prompt, batch_size=batch_size, limit=limit)
    notes = [f"decoding: {'greedy' if gen.temperature == 0 else f'sampled, T={gen.temperature}, seed {gen.seed}'}, "
             f"max_new_tokens {gen.max_new_tokens}; decisions: exact sign test (0/1 scores) or paired "
             f"permutation test, Holm-corrected over every suite and run, alpha {ALPHA}; intervals: "
             f"1000 paired bootstrap resamples, seed 0"]
    if limit:
        notes.append(f"limit {limit}: at most {limit} items of each suite were scored, evenly spaced "
                     f"over it; intervals are wider than with every item")

    groups = engine_groups({n: get(c["method"]["name"]).capabilities for n, c in run_configs.items()})
    if len(groups) > 1:
        notes.append("runs that cannot share one base in memory were scored on engines of their own, in "
                     "turn: " + "; ".join(", ".join(([BASE] if i == 0 else []) + g) for i, g in enumerate(groups)))
    tokenizer = RunDir(Path(runs[0])).tokenizer if runs else None  # one chat template for every engine
    parts, held_out = [], None
    for i, group in enumerate(groups):
        engine = Engine.from_runs({n: names[n] for n in group}, model=model, tokenizer=tokenizer)
        if i == 0:
            model_path = engine.model_path
            if "in_domain" in suites:
                held_out = held_out_split(data, first, engine)
                if held_out is None:
                    notes.append("in_domain skipped: no held-out split (set data.val_size)")
        parts.append(run_suites(engine, ([BASE] if i == 0 else []) + group, ctx, suites, held_out,
                                persona_probes, general_probes, benchmarks))
        del engine  # the next engine's weights take its place
        release_memory()
    results = merge_results(parts, models)

    report = {
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
        "base": BASE,
        "models": [{"name": BASE, "kind": "base", "summary": model_path or ""}]
        + [{"name": n, "kind": "run", "run_dir": str(r),
            "summary": run_configs[n]["method"]["name"]} for n, r in names.items()],
        "suites": {},
        "answers": [row for r in results for row in r.answers],
        "curves": {n: loss_curves(RunDir(Path(r))) for n, r in names.items()},
        "configs": run_configs,
    }
    comparisons = [compare_suite(r.scores, BASE, suite=r.name, metric=r.metric,
                                 higher_is_better=r.higher_is_better, groups=r.groups) for r in results]
    family = holm_adjust(comparisons)  # one family: every suite x every run of this report
    notes.append(f"Holm correction over {family} comparisons (suites x runs vs {BASE})")
    for r, c in zip(results, comparisons):
        comparison = c.to_dict()
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


def engine_groups(capabilities: dict) -> list[list[str]]:
    """Run names partitioned into the sets one Engine can hold each, from their methods'
    `Capabilities` (name -> capabilities, in the runs' order; the order is kept in each set).

    The first set is the one whose engine also serves the base (it may be empty). Weight
    deltas of one PEFT type share an engine; virtual tokens and prefixes join the first
    engine on the base (they switch the deltas off), a run that replaced the base's weights
    (freeze, full) gets an engine of its own. So runs that worked together on one engine
    before stay together, in the base's engine.
    """
    shared: list[tuple[list[str], set[str]]] = [([], set())]  # (names, PEFT types held)
    alone: list[list[str]] = []
    for name, caps in capabilities.items():
        if caps.adapter_kind == "whole_model":
            alone.append([name])
            continue
        wanted = {caps.peft_type} if caps.adapter_kind == "weight_delta" else set()
        for names, held in shared:
            if not held or not wanted or held == wanted:
                names.append(name)
                held |= wanted
                break
        else:
            shared.append(([name], wanted))
    return [names for names, _ in shared] + alone


def run_suites(engine, models: list[str], ctx: Context, suites: list[Suite], held_out,
               persona_probes: Optional[str], general_probes: Optional[str],
               benchmarks: list[Benchmark]) -> list[SuiteResult]:
    """Every chosen suite's results for `models`, all held by `engine`."""
    results: list[SuiteResult] = []
    for suite in suites:
        print(f"suite {suite}")
        if suite == "in_domain":
            if held_out is not None:
                results += in_domain.run(engine, models, ctx, *held_out)
        elif suite == "persona":
            results += persona.run(engine, models, ctx, persona_probes)
        elif suite == "general":
            results += general.run(engine, models, ctx, general_probes)
        elif suite == "benchmarks":
            results += benchmarks_suite.run(engine, models, ctx, benchmarks)
    return results


def release_memory() -> None:
    """Free what an engine no longer referenced held (its graphs hold cycles), CUDA's cache too."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


SPLIT_FIELDS = ("seed", "val_size", "limit")
"""data.* settings that decide which rows a run held out (with the data file's sha256)."""


def check_same_split(names: dict[str, str], configs: dict[str, dict]) -> None:
    """Refuse runs whose held-out rows differ: another data file (by sha256 in inputs.json),
    seed, val_size or limit. Their in-domain scores would be on other rows, and a run's
    "held-out" rows could be another run's training rows."""
    def split_of(name: str) -> dict:
        data = configs[name].get("data") or {}
        inputs = RunDir(Path(names[name])).inputs
        sha = (json.loads(inputs.read_text()).get("data") or {}).get("sha256") if inputs.is_file() else None
        return {"data sha256": sha, **{f"data.{k}": data.get(k) for k in SPLIT_FIELDS}}

    if len(names) < 2:
        return
    first, *others = names
    reference = split_of(first)
    problems = []
    for name in others:
        theirs = split_of(name)
        problems += [f"{key}: {first} has {reference[key]!r}, {name} has {theirs[key]!r}"
                     for key in reference if theirs[key] != reference[key]]
    if problems:
        raise ValueError("refusing to compare runs trained on different data splits (their held-out "
                         "rows differ):\n  " + "\n  ".join(problems)
                         + "\nEvaluate them separately, or retrain them on one data file, seed, val_size and limit")


def held_out_split(data: Optional[DataConfig], first_run: dict, engine):
    """(examples, rendered rows) of the held-out split, drawn exactly as training drew it."""
    if data is None:
        if not first_run.get("data"):
            return None
        data = from_dict(DataConfig, first_run["data"])
    if not data.val_size:
        return None
    loaded = load_examples(data.path, data.system_prompt, "skip", data.limit)
    _, val = split(loaded.examples, data.val_size, data.seed)
    # rendered as training rendered them (its truncation; rows it dropped stay dropped)
    rows = [engine.format.render(example.messages, data.max_length, data.supervise, data.truncation)
            for example in val]
    kept = [(e, r) for e, r in zip(val, rows) if r is not None and r.num_supervised > 0]
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
