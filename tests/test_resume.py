"""Exact resume and its guards, in-process on the tiny model (CPU, fp32).

A crash is injected at the start of a chosen optimizer step (an exception from
`step_rows`); the rerun resumes from the newest checkpoint. Losses, gradient norms,
learning rates and the adapter must be bit-identical to an uninterrupted run, with gradient
accumulation, LoRA dropout 0.1 and a held-out split, mid-epoch and at an epoch boundary.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from faults import (ROWS, adapter_tensors, assert_same_tensors, data_file, metrics, one_thread,  # noqa: F401
                    quick_train, results, step_hook)
from tunelab.runs import ResumeRefused, RunDir

# 10 train rows + 2 held out, 4 rows a step (2 micro-batches of 2): 3 steps an epoch, the
# last one of 2 rows; LoRA dropout 0.1 (the default) draws fresh masks every forward pass.
SETTINGS = dict(max_steps=8, batch_size=4, micro_batch_size=2, save_every=2, keep_checkpoints=3)


class Crash(RuntimeError):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """The process 'dies' when optimizer step `step` (0-based) starts."""
    def on_step(current):
        if current == step:
            raise Crash(f"injected crash at step {step + 1}")
    step_hook(monkeypatch)["on_step"] = on_step


@pytest.fixture(scope="module")
def reference(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    data = data_file(root)
    return quick_train(tiny_qwen, data, root / "run", val_size=2, **SETTINGS), data


@pytest.mark.parametrize("late", [False, True], ids=["loss read at once", "loss read a step late (GPU)"])
@pytest.mark.parametrize("crash_step, save_every", [(5, 2), (6, 3)],
                         ids=["mid-epoch (checkpoint 4, crash in step 6)", "epoch boundary (checkpoint 6)"])
def test_resume_is_bit_identical(reference, tiny_qwen, tmp_path, monkeypatch, crash_step, save_every, late):
    """Also with the GPU's lagged loss read (train.read_late): the step queued before the
    crash is still read and logged on the way out."""
    ref_run, data = reference
    monkeypatch.setattr("tunelab.train.read_late", lambda device: late)
    settings = {**SETTINGS, "save_every": save_every}
    with monkeypatch.context() as patch:
        crash_at(patch, crash_step)
        with pytest.raises(Crash):
            quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, **settings)
    checkpoint_step = crash_step // save_every * save_every
    assert RunDir(tmp_path / "run").complete_checkpoints()[-1].name == f"step-{checkpoint_step:07d}"
    assert len(metrics(tmp_path / "run")) == crash_step  # records past the checkpoint exist...

    quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, **settings)
    assert results(tmp_path / "run") == results(ref_run)  # ...and are replaced, not duplicated
    assert any("val_loss" in r for r in metrics(ref_run))
    assert_same_tensors(adapter_tensors(tmp_path / "run" / "adapter"), adapter_tensors(ref_run / "adapter"))


def test_the_comparison_catches_a_dropout_rng_that_is_not_restored(reference, tiny_qwen, tmp_path, monkeypatch):
    """Negative control: skip restoring the RNG on resume and the losses differ."""
    import tunelab.train as train_module

    ref_run, data = reference
    with monkeypatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, **SETTINGS)
    monkeypatch.setattr(train_module, "set_rng_state", lambda state: None)
    quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, **SETTINGS)
    ours, theirs = results(tmp_path / "run"), results(ref_run)
    assert ours[:4] == theirs[:4] and ours[4:] != theirs[4:]


@pytest.fixture
def interrupted(tiny_qwen, tmp_path, monkeypatch):
    """A run stopped at step 5 with checkpoints at 2 and 4, on its own copy of the model."""
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen, model)
    data = data_file(tmp_path)
    with monkeypatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            quick_train(model, data, tmp_path / "run", **SETTINGS)
    return model, data, tmp_path / "run"


def test_changed_data_is_refused(interrupted):
    model, data, run = interrupted
    config_before = RunDir(run).config.read_bytes()
    data_file(data.parent, ROWS[:-1] + [{**ROWS[-1], "output": "changed"}])
    with pytest.raises(ResumeRefused, match=r"(?s)other inputs.*data .*rows.jsonl: contents changed"):
        quick_train(model, data, run, **SETTINGS)
    assert RunDir(run).config.read_bytes() == config_before  # the old config was compared, not overwritten


def test_changed_base_model_is_refused_moved_one_is_not(interrupted, tmp_path, capsys):
    from conftest import build_model, build_tokenizer

    model, data, run = interrupted
    moved = shutil.copytree(model, tmp_path / "moved")  # the same files in another directory
    build_model("qwen2", len(build_tokenizer()), seed=1).save_pretrained(tmp_path / "reseeded")
    shutil.copy(tmp_path / "reseeded" / "model.safetensors", model / "model.safetensors")
    with pytest.raises(ResumeRefused, match=r"base model .*model.safetensors: contents differ"):
        quick_train(model, data, run, **SETTINGS)
    quick_train(moved, data, run, **SETTINGS)  # --model.path may change; the weights may not
    assert "resuming from" in capsys.readouterr().out and RunDir(run).done.exists()


def test_changed_settings_need_the_flag(interrupted, capsys):
    model, data, run = interrupted
    with pytest.raises(ResumeRefused, match=r"--train\.lr: 0\.01 -> 0\.02\n.*--allow_config_change true"):
        quick_train(model, data, run, **{**SETTINGS, "lr": 2e-2})
    # Logging and checkpoint cadence change nothing learned: no flag needed for them.
    quick_train(model, data, run, **{**SETTINGS, "lr": 2e-2, "log_every": 2, "save_every": 4},
                allow_config_change=True)
    assert yaml.safe_load(RunDir(run).config.read_text())["train"]["lr"] == 2e-2
    assert "resuming from" in capsys.readouterr().out
    assert RunDir(run).done.exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_run_resumes_exactly(tiny_qwen, tmp_path, monkeypatch, init):
    """PiSSA/OLoRA train on a residual base their initialisation computes: a checkpoint keeps
    the unconverted adapter and resuming redoes the initialisation (the learning matrix's
    `resume` cell on the GPU failed here: a converted rank-2r adapter met rank-r optimizer state)."""
    from tunelab.methods import MethodConfig
    from tunelab.methods.lora import LoraConfig

    method = MethodConfig(name="lora", lora=LoraConfig(init=init))
    data = data_file(tmp_path)
    whole = quick_train(tiny_qwen, data, tmp_path / "whole", val_size=2, method=method, **SETTINGS)
    with monkeypatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, method=method, **SETTINGS)
    resumed = quick_train(tiny_qwen, data, tmp_path / "run", val_size=2, method=method, **SETTINGS)
    assert results(resumed) == results(whole)
    assert_same_tensors(adapter_tensors(RunDir(resumed).adapter), adapter_tensors(RunDir(whole).adapter))


def test_finished_run_is_not_retrained_and_resume_false_starts_over(interrupted, capsys):
    model, data, run = interrupted
    quick_train(model, data, run, **SETTINGS)
    assert RunDir(run).done.exists()
    before = adapter_tensors(run / "adapter")
    capsys.readouterr()
    quick_train(model, data, run, **SETTINGS)
    assert "already finished" in capsys.readouterr().out
    quick_train(model, data, run, resume=False, **{**SETTINGS, "max_steps": 2})
    assert "starting" in capsys.readouterr().out and len(metrics(run)) == 2
    assert [p.name for p in RunDir(run).complete_checkpoints()] == ["step-0000002"]
    assert adapter_tensors(run / "adapter").keys() == before.keys()
