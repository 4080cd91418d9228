"""End to end on tiny models: training lowers the loss, the run directory describes itself,
the adapter reloads to identical logits, and chat with the adapter differs from the base."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tunelab.config import DataConfig, GenerationConfig, ModelConfig, TrainConfig
from tunelab.generate import Engine
from tunelab.methods import MethodConfig
from tunelab.runs import RunDir, load_run
from tunelab.train import train

QUESTION = [{"role": "user", "content": "你是谁？"}]


def quick_train(model_dir, data_path, out, **overrides):
    cfg = dict(max_steps=40, batch_size=4, micro_batch_size=2, lr=1e-2, save_every=20, log_every=1)
    cfg.update(overrides)
    return train(ModelConfig(path=str(model_dir)), DataConfig(path=str(data_path), val_size=0),
                 MethodConfig(), TrainConfig(**cfg), out=str(out))


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    from conftest import MEMORIZE, write_jsonl

    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "data.jsonl", MEMORIZE * 3)
    return quick_train(tiny_qwen, data, root / "run"), tiny_qwen


def test_loss_falls_clearly(trained):
    run, _ = trained
    losses = [json.loads(line)["loss"] for line in RunDir(run).metrics.read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_run_directory_describes_itself(trained):
    run, model_dir = trained
    rd = RunDir(run)
    for path in (rd.config, rd.data_stats, rd.metrics, rd.summary, rd.done,
                 rd.adapter / "adapter_model.safetensors", rd.tokenizer / "tokenizer_config.json"):
        assert path.exists(), path
    config = yaml.safe_load(rd.config.read_text())
    assert config["model"]["path"] == str(model_dir)
    assert config["method"]["name"] == "lora" and config["method"]["lora"]["r"] == 8
    assert config["train"]["lr"] == 1e-2
    stats = json.loads(rd.data_stats.read_text())
    assert stats["train"]["rows"] == 12 and stats["duplicates"] == 8
    summary = json.loads(rd.summary.read_text())
    assert summary["steps"] == 40 and summary["trainable_params"] > 0
    assert [p.name for p in rd.complete_checkpoints()] == ["step-0000020", "step-0000040"]
    from transformers import AutoTokenizer

    assert "<|im_end|>" in AutoTokenizer.from_pretrained(rd.tokenizer).chat_template


def test_adapter_reloads_to_identical_logits(trained):
    run, _ = trained
    model_a, tok, _ = load_run(run)
    model_b, _, _ = load_run(run)
    ids = torch.tensor([Engine(model_a, tok).format.prompt_ids(QUESTION)])
    with torch.no_grad():  # equal up to fp32 rounding: MKL's kernels may differ with buffer alignment
        torch.testing.assert_close(model_a(ids).logits, model_b(ids).logits, rtol=1e-5, atol=1e-5)


def test_chat_with_the_adapter_differs_from_the_base(trained):
    run, _ = trained
    tuned, tok, _ = load_run(run)
    base, _, _ = load_run(run, adapter=False)
    gen = GenerationConfig(max_new_tokens=12)
    tuned_answer = Engine(tuned, tok).generate([QUESTION], gen)[0]
    base_answer = Engine(base, tok).generate([QUESTION], gen)[0]
    assert tuned_answer != base_answer
    assert tuned_answer.startswith("我是甄嬛")  # memorized


def test_cli_train_chat_and_inspect_end_to_end(tiny_llama, tmp_path):
    """The console verbs on a pad == eos Llama-architecture model."""
    from conftest import MEMORIZE, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", MEMORIZE * 2)
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "tunelab.cli"]
    done = subprocess.run(cli + ["train", "--model.path", str(tiny_llama), "--data.path", str(data),
                                 "--data.val_size", "2", "--train.max_steps", "3", "--train.batch_size", "2",
                                 "--train.micro_batch_size", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "DONE").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3 and "val_loss" in metrics[-1]

    chat = subprocess.run(cli + ["chat", "--run", str(out), "--prompt", "hi", "--gen.max_new_tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]

    inspect = subprocess.run(cli + ["data", "inspect", "--data.path", str(data), "--model.path", str(tiny_llama)],
                             capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert "8 records read" in inspect.stdout and "[[" in inspect.stdout and "<|im_end|>]]" in inspect.stdout


def test_cli_bad_value_names_the_field(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--model.path", "x",
                           "--data.path", "y", "--train.lr", "-1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "`--train.lr` must be > 0, got -1.0" in done.stderr
    assert "Traceback" not in done.stderr
    bad_choice = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--data.truncation", "left"],
                                capture_output=True, text=True, timeout=120)
    assert bad_choice.returncode == 2 and "data.truncation" in bad_choice.stderr


def test_missing_model_says_how_to_give_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--model.path", "nobody/no-model",
                           "--data.path", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "nobody/no-model" in done.stderr and "--model.path /path/to/model" in done.stderr
    assert "Traceback" not in done.stderr


def test_readback_holds_a_copy_taken_when_queued():
    """A step's values read later are those it had when queued, not what the tensor holds
    by then (on a GPU the copy goes to pinned memory, ordered right after the step)."""
    from tunelab.step import Readback

    values = torch.tensor([2.5, 0.75])
    readback = Readback(values)
    values.fill_(float("nan"))
    assert readback.tolist() == [2.5, 0.75]


def test_lora_dropout_kernel_choice_holds_for_the_run_only(tiny_qwen, tmp_path, monkeypatch):
    """`--train.lora_dropout_kernel bits` switches fused LoRA's dropout to the mask-bits pair
    for the run's forwards, and the next run in the same process draws with the default pair
    again; a bad value names the field."""
    from conftest import MEMORIZE, write_jsonl
    from tunelab.accel import lora as lora_fused

    seen, real = [], lora_fused.dropout_low
    monkeypatch.setattr(lora_fused, "dropout_low", lambda *a, **k: (seen.append(k["bits"]), real(*a, **k))[1])
    data = write_jsonl(tmp_path / "data.jsonl", MEMORIZE)
    quick_train(tiny_qwen, data, tmp_path / "run", max_steps=2, save_every=0, lora_dropout_kernel="bits")
    assert seen[-1] and seen.count(True) >= 4  # every training forward (not the setup's probe)
    seen.clear()
    quick_train(tiny_qwen, data, tmp_path / "next", max_steps=2, save_every=0)
    assert seen and not any(seen)  # the choice held for its run only
    with pytest.raises(ValueError, match="train.lora_dropout_kernel"):
        TrainConfig(lora_dropout_kernel="fused")


def test_the_logged_lr_is_the_one_each_step_used(trained):
    from tunelab.train import lr_lambda

    run, _ = trained
    cfg = TrainConfig(**yaml.safe_load(RunDir(run).config.read_text())["train"])
    schedule = lr_lambda(cfg, 40)
    logged = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    # record of step s (1-based) is the update made with the schedule's value at index s - 1
    assert [r["lr"] for r in logged] == pytest.approx([cfg.lr * schedule(r["step"] - 1) for r in logged])
    assert logged[0]["lr"] == pytest.approx(cfg.lr * schedule(0))
