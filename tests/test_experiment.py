"""`tunelab experiment` end to end on a tiny model: two methods, one budget, one report;
a rerun skips the finished runs."""

from __future__ import annotations

import json

import yaml

from conftest import MEMORIZE, write_jsonl
from tunelab.experiment import experiment

PROBES = {"probes": [
    {"id": "who", "lang": "zh", "category": "persona", "question": "你是谁？",
     "check": {"type": "contains", "any": ["甄嬛"]}, "reference": "我是甄嬛。"},
    {"id": "capital", "lang": "en", "category": "persona", "question": "What is the capital of France?",
     "check": {"type": "contains", "any": ["Paris"]}, "reference": "Paris."},
]}


def write_experiment(tmp_path, model_dir) -> str:
    write_jsonl(tmp_path / "data.jsonl", MEMORIZE * 4)
    (tmp_path / "probes.yaml").write_text(yaml.safe_dump(PROBES, allow_unicode=True))
    (tmp_path / "mc.csv").write_text("question,A,B,C,D,answer\n1+1?,1,2,3,4,B\n2+2?,4,5,6,7,A\n3+3?,5,7,6,9,C\n")
    spec = {
        "name": "tiny",
        "model": {"path": str(model_dir)},
        "data": {"path": "data.jsonl", "system_prompt": "现在你要扮演皇帝身边的女人--甄嬛", "val_size": 4},
        "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2, "save_every": 0},
        "methods": [{"name": "lora"}, {"name": "ptuning", "train": {"lr": 1e-3},
                                       "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}},
                    {"name": "lora", "label": "lora-mitigated",
                     "mitigate": {"replay": 0.2, "replay_prompts": 4, "replay_max_new_tokens": 4, "kl": 0.1}}],
        "eval": {"suites": ["in_domain", "persona", "general", "benchmarks"], "persona_probes": "probes.yaml",
                 "benchmarks": [{"path": "mc.csv", "shots": 1}], "limit": 6, "gen": {"max_new_tokens": 8},
                 "batch_size": 4},
        "out": str(tmp_path / "exp"),
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return str(path)


def test_experiment_trains_evaluates_reports_and_resumes(tiny_qwen, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))  # the replay answers' cache
    config = write_experiment(tmp_path, tiny_qwen)
    report = experiment(config)
    out = tmp_path / "exp"
    for name in ("results.json", "report.md", "report.html"):
        assert (out / "report" / name).is_file()
    results = json.loads((out / "report" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "lora", "ptuning", "lora-mitigated"]
    expected = {"in_domain_loss", "in_domain_char_f1", "in_domain_rouge_l", "in_domain_exact_match",
                "persona", "general", "general_persona", "mc_mc_1shot"}
    assert expected <= set(results["suites"])
    assert set(results["suites"]["general"]["deltas"]) == {"lora", "ptuning", "lora-mitigated"}
    table = {row["model"]: row for row in report["methods"]}
    assert table["lora"]["trainable_params"] > 0 and table["ptuning"]["trainable_params"] > 0
    assert table["lora"]["trainable_params"] != table["ptuning"]["trainable_params"]
    # general ability under the persona prompt, with its delta, interval and the test's decision
    general = results["suites"]["general_persona"]["deltas"]["lora"]
    assert table["lora"]["general_suite"] == "general_persona"
    assert (table["lora"]["general_delta"], table["lora"]["general_decision"]) == (general["delta"], general["decision"])
    assert table["lora"]["general_ci_low"] <= table["lora"]["general_delta"] <= table["lora"]["general_ci_high"]
    assert table["lora"]["persona_decision"] in ("gain", "loss", "no decision")
    # the trade: mitigation named, general kept as % of the base with its interval, the chart
    assert table["lora"]["mitigation"] == "-"
    assert table["lora-mitigated"]["mitigation"] == "replay 0.2, kl 0.1 on replay"
    base_general = results["suites"]["general_persona"]["scores"]["base"]["mean"]
    if base_general:
        kept = table["lora"]["general_kept_pct"]
        assert kept == round(100 * table["lora"]["general_score"] / base_general, 1)
        assert table["lora"]["general_kept_low"] <= kept <= table["lora"]["general_kept_high"]
    assert "general_plain_delta" in table["lora"]
    assert (out / "report" / "trade.svg").is_file() == ("![persona gain" in (out / "report" / "report.md").read_text())
    html = (out / "report" / "report.html").read_text()
    assert "<svg" in html and "ptuning" in html and "你是谁" in html
    printed = capsys.readouterr().out
    assert "trainable" in printed and "report.html" in printed

    # rerun: every run is found by its config hash and skipped
    experiment(config)
    assert printed.count("training ->") == 3
    assert capsys.readouterr().out.count("finished earlier") == 3
