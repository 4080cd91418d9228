"""Shared pieces of the fault-injection tests (test_reliability, test_resume, test_safe_loading):
distinct training rows, an in-process run, hooks that poison the loss or only the gradients
on chosen steps, and a check that a directory marked COMPLETE really loads.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from tunelab.config import DataConfig, ModelConfig, TrainConfig
from tunelab.methods import MethodConfig
from tunelab.runs import COMPLETE, RunDir, check_adapter, load_trainer_state
from tunelab.train import train

# Distinct rows of different lengths, so the data order and the padding both matter.
ROWS = [{"instruction": f"Question {i}: what is {i} plus {i}?" + " Please think." * (i % 3),
         "input": "", "output": f"{i} plus {i} is {2 * i}." + " Sure." * (i % 4)} for i in range(12)]
RESULT_KEYS = ("step", "epoch", "loss", "grad_norm", "lr", "tokens", "skipped_steps", "val_loss")
"""Metrics that must match exactly between an interrupted and an uninterrupted run."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices run faster on one thread, and a 2-core CI runner is shared (imported by
    the test modules that train, it applies to them only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_file(directory: Path, rows: list[dict] = ROWS) -> Path:
    return write_jsonl(Path(directory) / "rows.jsonl", rows)


def quick_train(model_dir: Path, data: Path, out: Path, *, val_size: float = 0, resume: bool = True,
                allow_config_change: bool = False, method: MethodConfig | None = None, **overrides) -> Path:
    """An in-process run on the tiny model; TrainConfig fields as keywords."""
    cfg = dict(max_steps=8, batch_size=4, micro_batch_size=2, lr=1e-2, save_every=2, log_every=1)
    cfg.update(overrides)
    return train(ModelConfig(path=str(model_dir)), DataConfig(path=str(data), val_size=val_size),
                 method or MethodConfig(), TrainConfig(**cfg), out=str(out), resume=resume,
                 allow_config_change=allow_config_change)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]


def results(run: Path) -> list[tuple]:
    """The learning-relevant columns of metrics.jsonl (NaN compared as a string)."""
    def same(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value
    return [tuple(same(r.get(k)) for k in RESULT_KEYS) for r in metrics(run)]


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def step_hook(monkeypatch) -> dict:
    """Wrap train.step_rows so tests know which optimizer step (0-based) is running and can
    act at its start: returns a dict with `step` and an optional `on_step(step)` callback."""
    import tunelab.train as train_module

    current = {"step": None, "on_step": None}
    original = train_module.step_rows

    def step_rows(rows, cfg, step, steps_per_epoch):
        current["step"] = step
        if current["on_step"]:
            current["on_step"](step)
        return original(rows, cfg, step, steps_per_epoch)

    monkeypatch.setattr(train_module, "step_rows", step_rows)
    return current


def capture_base(monkeypatch, install=None) -> dict:
    """Wrap train.load_model: keep the base model (and let `install(base)` add hooks to it)."""
    import tunelab.train as train_module

    captured = {}
    original = train_module.load_model

    def load_model(cfg, device=None):
        base = original(cfg, device)
        captured["base"] = base
        if install:
            install(base)
        return base

    monkeypatch.setattr(train_module, "load_model", load_model)
    return captured


class NanGradient(torch.autograd.Function):
    """Identity in the forward pass, NaN in the backward: a finite loss with NaN gradients,
    the failure seen with bf16 SDPA on padded batches."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, steps: set[int], kind: str) -> dict:
    """On optimizer steps `steps` (0-based) make the gradients (`grad`) or the loss (`loss`)
    NaN, through a forward hook on the model's final norm."""
    current = step_hook(monkeypatch)

    def install(base):
        def hook(module, args, output):
            if not module.training or current["step"] not in steps:
                return output
            return NanGradient.apply(output) if kind == "grad" else output * float("nan")
        base.model.norm.register_forward_hook(hook)

    capture_base(monkeypatch, install)
    return current


def complete_dirs(run: Path) -> list[Path]:
    """Every directory under `run` that carries the COMPLETE marker, whatever its name."""
    return sorted(p.parent for p in Path(run).rglob(COMPLETE))


def assert_loads(directory: Path, base: torch.nn.Module) -> None:
    """A directory marked COMPLETE must load: checkpoint (adapter + trainer state + state)
    or adapter alone, with finite weights that fit the base."""
    from peft import PeftModel

    adapter = directory / "adapter" if (directory / "adapter").is_dir() else directory
    check_adapter(adapter, base)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.isfinite(param).all(), f"{directory}: {name} is not finite"
    if (directory / "trainer_state.pt").exists() or directory.parent.name == "checkpoints":
        state = load_trainer_state(directory)
        assert {"optimizer", "scheduler", "rng"} <= state.keys()
        assert json.loads((directory / "state.json").read_text())["step"] >= 1
