"""The evaluation-speed harness end to end on the CPU: a tiny random Qwen2 shape with a LoRA
and a P-Tuning adapter built in-process, the bundled general probes and a small held-out split.

The GPU figure comes from the same code (`bench/eval_speed.py --gpu`)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROOT = BENCH.parent


def test_eval_speed_runs_on_cpu_and_compares(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import eval_speed

    build_tokenizer().save_pretrained(tmp_path / "tok")
    rows = [{"instruction": f"{q} {i}", "input": "", "output": a} for i in range(6) for q, a in [
        ("你是谁？", "我是甄嬛。"), ("Who are you?", "I am a helpful assistant."),
        ("What is the capital of France?", "Paris."), ("1.11 和 1.9 哪个大？", "1.9 更大。")]]
    (tmp_path / "data.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    argv = ["--shape", "tiny", "--device", "cpu", "--tokenizer", str(tmp_path / "tok"),
            "--data", str(tmp_path / "data.json"), "--val-size", "8", "--limit", "6",
            "--batch-size", "4", "--max-new-tokens", "6"]
    first = eval_speed.main(argv + ["--out", str(tmp_path / "a.json")])
    assert first["models"] == ["base", "lora", "ptuning"]
    assert set(first["suite_seconds"]) == {"in_domain", "in_domain_loss", "persona", "general"}
    # in_domain 6 + persona 6 + general 6 + general_persona 6 items, each asked of 3 models
    assert first["answers"] == 3 * 4 * 6 and 0 < first["answer_tokens"] <= first["answers"] * 6
    # the held-out loss is scored by teacher forcing: --limit 6 of the 8 rows, for each of 3 models
    assert first["scored_rows"] == 3 * 6 and 0 < first["score_seconds"] <= first["suite_seconds"]["in_domain_loss"]
    assert set(first["in_domain_loss"]) == {"base", "lora", "ptuning"}
    assert len({round(v, 6) for v in first["in_domain_loss"].values()}) == 3  # the adapters change the model
    assert json.loads((tmp_path / "a.json").read_text())["answers_sha256"] == first["answers_sha256"]

    second = eval_speed.main(argv + ["--out", str(tmp_path / "b.json")])
    assert second["answers_sha256"] == first["answers_sha256"]  # a rerun gives the same answers
    same = eval_speed.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert same["identical"] == same["answers_compared"] == 3 * 4 * 6
