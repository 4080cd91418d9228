"""The throughput harness end to end on the CPU: a tiny model, a tiny tokenizer, a few rows.

The GPU table comes from the same code (`bench/throughput.py` without --cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    build_tokenizer().save_pretrained(root / "tok")
    rows = [{"instruction": q, "input": "", "output": a} for q, a in [
        ("你是谁？", "我是甄嬛，家父是大理寺少卿甄远道。"), ("Who are you?", "I am a helpful assistant."),
        ("What is the capital of France?", "Paris is the capital of France."), ("1.11 和 1.9 哪个大？", "1.9 更大。"),
    ] * 12]
    (root / "data.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root


def test_cpu_mode_compares_reference_and_tunelab(bench_inputs, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput

    out = tmp_path / "report.json"
    report = throughput.main(["--cpu", "--data", str(bench_inputs / "data.json"), "--tokenizer",
                              str(bench_inputs / "tok"), "--steps", "2", "--warmup", "1", "--ref-steps", "1",
                              "--ref-warmup", "1", "--cases", "ref-lora-1.5b-gc", "lora-1.5b", "ptuning-1.5b",
                              "--json", str(out)])
    results = report["results"]
    assert all(results[name] for name in ("ref-lora-1.5b-gc", "lora-1.5b", "ptuning-1.5b")), results
    reference, fast = results["ref-lora-1.5b-gc"], results["lora-1.5b"]
    assert reference["runner"] == "reference" and reference["shape"] == "tiny"
    assert reference["tokens"] > 0 and reference["padding"] > 0  # DataCollatorForSeq2Seq pads
    assert fast["packed"] and fast["fused_loss"] and fast["padding"] == 0
    assert fast["rows_per_step"] == 8 and fast["forwards_per_step"] == 1
    assert not results["ptuning-1.5b"]["packed"]  # virtual tokens: padded path
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["three_epochs_min"] > 0
    for name in ("lora-1.5b", "ptuning-1.5b"):  # each speed comes with its own learning check
        r = results[name]
        assert r["probe_loss_after"] < r["probe_loss_before"], r
        assert abs(r["probe_loss_after"] - r["probe_loss_plain_peft"]) < 1e-3, r
    assert json.loads(out.read_text())["results"]["lora-1.5b"]["case"] == "lora-1.5b"


def test_reference_rendering_appends_pad_and_masks_the_prompt(bench_inputs, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from transformers import AutoTokenizer

    from common import reference_features

    tok = AutoTokenizer.from_pretrained(bench_inputs / "tok")
    feature = reference_features(str(bench_inputs / "data.json"), tok)[0]
    assert feature["input_ids"][-1] == tok.pad_token_id == feature["labels"][-1]
    supervised = [t for t in feature["labels"] if t != -100]
    assert tok.decode(supervised[:-1]) == "我是甄嬛，家父是大理寺少卿甄远道。"
    assert tok.decode(feature["input_ids"][:len(feature["input_ids"]) - len(supervised)]).endswith(
        "<|im_start|>assistant\n")


def test_scaling_harness_on_one_cpu_process(bench_inputs, tmp_path, monkeypatch):
    """bench/scaling.py without torchrun (one process); the GPU runs use the same code under
    `torchrun --nproc_per_node N`, whose training path tests/test_distributed.py checks."""
    monkeypatch.syspath_prepend(str(BENCH))
    import scaling

    out = tmp_path / "scaling.json"
    result = scaling.main(["--cpu", "--data", str(bench_inputs / "data.json"), "--tokenizer",
                           str(bench_inputs / "tok"), "--steps", "2", "--warmup", "1", "--batch-size", "8",
                           "--micro-batch-size", "4", "--val-rows", "8", "--lr", "1e-2", "--dropout", "0",
                           "--json", str(out)])
    assert result["gpus"] == 1 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert result["held_out_loss_after"] < result["held_out_loss_before"]
    assert json.loads(out.read_text())["held_out_rows"] == 8
    assert "| tiny | 1 |" in scaling.table([result])
