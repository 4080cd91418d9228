"""`tunelab experiment` with every registered method in one method list, on a tiny model.

Runs that cannot share one base in memory (IA3 beside LoRA, freeze, full) are evaluated on
engines of their own in turn; the report still holds every run on every suite, with the
base scored once.
"""

from __future__ import annotations

import importlib.util
import json
import weakref

import pytest
import torch
import yaml

from conftest import MEMORIZE, write_jsonl
from tunelab.config import GenerationConfig
from tunelab.evaluate.runner import engine_groups, evaluate
from tunelab.experiment import experiment
from tunelab.generate import Engine
from tunelab.methods import METHODS, get

PROBES = {"probes": [
    {"id": "who", "lang": "zh", "category": "persona", "question": "你是谁？",
     "check": {"type": "contains", "any": ["甄嬛"]}, "reference": "我是甄嬛。"},
]}
VIRTUAL = {"num_virtual_tokens": 4}
ENTRIES = {  # label -> its `methods:` entry; LoRA's variants are options of `lora`
    "lora": {"name": "lora", "lora": {"r": 4}},
    "dora": {"name": "lora", "label": "dora", "lora": {"r": 4, "dora": True}},
    "rslora": {"name": "lora", "label": "rslora", "lora": {"r": 4, "rslora": True}},
    "pissa": {"name": "lora", "label": "pissa", "lora": {"r": 4, "init": "pissa"}},
    "qlora": {"name": "qlora", "qlora": {"r": 4}},
    "ia3": {"name": "ia3"},
    "ptuning": {"name": "ptuning", "ptuning": {**VIRTUAL, "encoder_hidden_size": 16}},
    "prompt_tuning": {"name": "prompt_tuning", "prompt_tuning": VIRTUAL},
    "prefix": {"name": "prefix", "prefix": VIRTUAL},
    "freeze": {"name": "freeze", "freeze": {"layers": 1}},
    "full": {"name": "full"},
}
# QLoRA's 4-bit base needs bitsandbytes and a CUDA GPU; without them (CPU CI) its case is skipped.
HAS_QLORA = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


def test_entries_cover_every_registered_method():
    assert {entry["name"] for entry in ENTRIES.values()} == set(METHODS)


def test_engine_groups_follow_the_methods_capabilities():
    """One engine per PEFT type of weight deltas; virtual tokens and prefixes join the base's
    engine; freeze and full alone; the runs' order is kept."""

    def caps(**methods):
        return {name: get(method).capabilities for name, method in methods.items()}

    assert engine_groups(caps(lora="lora", ptuning="ptuning")) == [["lora", "ptuning"]]
    assert engine_groups({}) == [[]]
    assert engine_groups(caps(full="full", freeze="freeze")) == [[], ["full"], ["freeze"]]
    assert engine_groups(caps(lora="lora", ia3="ia3", p="ptuning", f="freeze", d="lora", pre="prefix",
                              full="full", q="qlora", ia3b="ia3", pt="prompt_tuning")) == \
        [["lora", "p", "d", "pre", "q", "pt"], ["ia3", "ia3b"], ["f"], ["full"]]
    assert engine_groups(caps(p="ptuning", ia3="ia3", lora="lora")) == [["p", "ia3"], ["lora"]]


@pytest.mark.parametrize("with_qlora", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_QLORA, reason="qlora needs bitsandbytes and a CUDA GPU"))])
def test_experiment_evaluates_every_method_in_one_report(tiny_qwen, tmp_path, with_qlora, monkeypatch):
    labels = [label for label in ENTRIES if with_qlora or label != "qlora"]
    write_jsonl(tmp_path / "data.jsonl", MEMORIZE * 3)
    (tmp_path / "probes.yaml").write_text(yaml.safe_dump(PROBES, allow_unicode=True))
    spec = {
        "name": "every-method",
        "model": {"path": str(tiny_qwen)},
        "data": {"path": "data.jsonl", "system_prompt": "现在你要扮演皇帝身边的女人--甄嬛", "val_size": 2},
        "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "save_every": 0},
        "methods": [ENTRIES[label] for label in labels],
        "eval": {"suites": ["in_domain", "persona", "general"], "persona_probes": "probes.yaml",
                 "limit": 2, "gen": {"max_new_tokens": 4}, "batch_size": 4},
        "out": str(tmp_path / "exp"),
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    report = experiment(str(tmp_path / "exp.yaml"))

    results = json.loads((tmp_path / "exp" / "report" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base"] + labels
    suites = {"in_domain_loss", "in_domain_char_f1", "in_domain_rouge_l", "in_domain_exact_match",
              "persona", "general", "general_persona"}
    assert suites <= set(results["suites"])
    for name in suites:
        suite = results["suites"][name]
        assert list(suite["scores"]) == ["base"] + labels, name  # every model, in the runs' order
        assert list(suite["deltas"]) == labels, name
        assert all(suite["scores"][m]["n"] == suite["scores"]["base"]["n"] > 0 for m in labels), name
    losses = {m: s["mean"] for m, s in results["suites"]["in_domain_loss"]["scores"].items()}
    print("in-domain loss per supervised token:", {m: round(v, 4) for m, v in losses.items()})
    # the whole-model runs were scored on their own weights, not the base's
    assert losses["full"] != losses["base"] and losses["freeze"] != losses["base"]
    rows = [row for row in results["answers"] if row["suite"] == "general"]
    assert rows and all(list(row["answers"]) == ["base"] + labels for row in rows)
    assert [row["model"] for row in report["methods"]] == labels
    assert any("engines of their own" in note and "; ia3; freeze; full" in note for note in results["notes"])

    # each engine's share is what evaluating those runs alone gives: IA3 scored here on the
    # base's engine, freeze and full after a base-only engine; the base the same every time
    models = tmp_path / "exp" / "models"
    mixed = {(row["suite"], row["id"]): row for row in results["answers"]}
    built = []  # each engine is gone before the next loads its weights
    original = Engine.from_runs.__func__

    def from_runs(cls, *args, **kwargs):
        assert all(ref() is None for ref in built), "an engine outlived its turn"
        engine = original(cls, *args, **kwargs)
        built.append(weakref.ref(engine.base))
        return engine

    monkeypatch.setattr(Engine, "from_runs", classmethod(from_runs))
    for alone_runs in (["ia3"], ["freeze", "full"]):
        alone = evaluate(runs=[str(models / r) for r in alone_runs], suites=["in_domain", "general"],
                         gen=GenerationConfig(max_new_tokens=4), batch_size=4, limit=2, out=str(tmp_path / "alone"))
        scored = ["base"] + alone_runs
        for name in ("in_domain_loss", "in_domain_rouge_l", "general", "general_persona"):
            for model in scored:
                assert alone["suites"][name]["scores"][model] == results["suites"][name]["scores"][model], \
                    (name, model)
        assert alone["answers"]
        for row in alone["answers"]:
            held = mixed[row["suite"], row["id"]]
            for model in scored:
                assert (row["answers"][model], row["scores"][model]) == (held["answers"][model], held["scores"][model])

    assert len(built) == 1 + 3

    markdown = (tmp_path / "exp" / "report" / "report.md").read_text()
    for label in labels:  # a row in the methods, models and per-suite summary tables
        assert sum(line.startswith(f"| {label} |") for line in markdown.splitlines()) >= 3, label
