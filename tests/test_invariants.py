"""The runtime invariants stop a run whose training path does not learn, before it saves.

Each check is shown passing on an honest run and failing on a sabotaged one: stale fused
LoRA copies (the bug that once trained every eager GPU path against its initial weights),
an optimizer that moves nothing, and a saved adapter that is not what was trained.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MEMORIZE, write_jsonl
from tunelab.accel import lora as lora_fused
from tunelab.config import DataConfig, ModelConfig, TrainConfig
from tunelab.invariants import InvariantBroken, tolerance
from tunelab.methods import MethodConfig
from tunelab.runs import RunDir
from tunelab import train as train_module
from tunelab.train import train


def run(model_dir, tmp_path, method="lora", **overrides):
    data = write_jsonl(tmp_path / "data.jsonl", MEMORIZE * 3)
    cfg = dict(max_steps=12, batch_size=4, micro_batch_size=2, lr=1e-2, save_every=6, eval_every=6)
    cfg.update(overrides)
    return train(ModelConfig(path=str(model_dir)), DataConfig(path=str(data), val_size=4),
                 MethodConfig(name=method), TrainConfig(**cfg), out=str(tmp_path / "run"))


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_an_honest_run_passes_and_records_its_checks(tiny_qwen, tmp_path, method):
    root = run(tiny_qwen, tmp_path, method)
    summary = json.loads(RunDir(root).summary.read_text())
    checks = summary["learning_checks"]
    assert checks["step"] == 12
    assert abs(checks["probe_loss_training_path"] - checks["probe_loss_plain_peft"]) <= checks["probe_tolerance"]
    assert abs(checks["probe_loss_reloaded"] - checks["probe_loss_training_path"]) <= checks["probe_tolerance"]
    records = [json.loads(line) for line in RunDir(root).metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "probe_loss_plain_peft" in r] == [6, 12]  # each evaluation


def test_stale_fused_copies_stop_the_run_before_any_save(tiny_qwen, tmp_path, monkeypatch):
    """Copies rebuilt once and never again: what the version-counter cache did under a fused
    AdamW. The forward then sees the initial weights while the real ones move."""
    real = lora_fused.AdapterCopies.refresh

    def once(self):
        if not getattr(self, "built", False):
            self.built = True
            real(self)
    monkeypatch.setattr(lora_fused.AdapterCopies, "refresh", once)
    with pytest.raises(InvariantBroken, match="plain PEFT|still exactly"):
        run(tiny_qwen, tmp_path)
    rd = RunDir(tmp_path / "run")
    assert not rd.adapter.exists() and not rd.complete_checkpoints() and not rd.done.exists()


def test_an_optimizer_that_moves_nothing_is_caught_at_the_first_step(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "apply_update", lambda optimizer, values: None)
    with pytest.raises(InvariantBroken, match="changed no trainable weight"):
        run(tiny_qwen, tmp_path)
    assert not RunDir(tmp_path / "run").adapter.exists()


def test_a_saved_adapter_that_is_not_what_was_trained_is_rejected(tiny_qwen, tmp_path, monkeypatch):
    from tunelab.methods import get

    method = get("lora")
    real_save = method.save

    def corrupt(net, directory):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.mul_(-3)
        real_save(net, directory)
    real_selected = train_module.selected

    def selected(cfg):
        chosen, options = real_selected(cfg)
        return _Swap(chosen, corrupt), options
    monkeypatch.setattr(train_module, "selected", selected)
    with pytest.raises(InvariantBroken, match="not what was trained"):
        run(tiny_qwen, tmp_path)
    rd = RunDir(tmp_path / "run")
    assert not rd.adapter.exists() and (rd.root / "adapter.rejected").is_dir() and not rd.done.exists()


class _Swap:
    """`method` with another save hook."""

    def __init__(self, method, save):
        self._method, self.save = method, save

    def __getattr__(self, name):
        return getattr(self._method, name)


def test_the_checks_can_be_turned_off(tiny_qwen, tmp_path):
    root = run(tiny_qwen, tmp_path, check_learning=False, max_steps=2)
    assert json.loads(RunDir(root).summary.read_text())["learning_checks"] is None


def test_tolerance_is_tight_in_fp32_and_loose_enough_for_bf16():
    assert tolerance(torch.float32, 3.0) < 2e-3
    assert 0.05 < tolerance(torch.bfloat16, 3.0) < 0.1
