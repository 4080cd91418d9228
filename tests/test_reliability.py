"""Fault injection: kill -9, signals, NaN, out of memory, disk full, bad data.

Each test injects one fault and checks the promise of docs/RELIABILITY.md that covers it.
Training processes for the crash and signal tests are real `tunelab train` processes forked
from a server that imported tunelab once (tests/forkserver.py), so a trial costs about a
second, not a Python start. TUNELAB_KILL_TRIALS sets the number of random-moment kills
(default 20), TUNELAB_SAVE_FAULTS the number of kills at exact points of a save (default 12)
and TUNELAB_KILL_SEED the seed that draws the moments and points.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch

from conftest import build_model, build_tokenizer
from faults import (adapter_tensors, assert_loads, assert_same_tensors, capture_base, complete_dirs,
                    data_file, metrics, one_thread, poison, quick_train, results, step_hook)  # noqa: F401
from forkserver import ForkServer, wait_for
from tunelab.runs import DiskFull, RunDir, load_trainer_state, save_checkpoint
from tunelab.step import OutOfMemory
from tunelab.train import TrainingDiverged

KILL_TRIALS = int(os.environ.get("TUNELAB_KILL_TRIALS", "20"))
SAVE_FAULTS = int(os.environ.get("TUNELAB_SAVE_FAULTS", "12"))
# Where a save can be cut short, and how many calls of each happen in the first few saves.
FAULT_POINTS = {"os.fsync": 30, "os.rename": 8, "os.unlink": 30, "os.replace": 3,
                "torch.save": 4, "safetensors": 4}


@pytest.fixture(scope="module")
def server():
    fork_server = ForkServer(env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                  "PYTHONUNBUFFERED": "1"})
    yield fork_server
    fork_server.close()


def train_argv(model: Path, data: Path, out: Path, **train) -> list[str]:
    argv = ["train", "--model.path", str(model), "--data.path", str(data), "--out", str(out)]
    for key, value in train.items():
        argv += [f"--train.{key}", str(value)]
    return argv


def newest_complete(run: Path) -> int | None:
    """Step of the checkpoint a resume should start from: a complete `step-N`, or a complete
    `step-N.tmp` killed just before its rename (RunDir.recover rolls it forward)."""
    steps = [int(m.group(1)) for d in complete_dirs(run)
             if d.parent.name == "checkpoints" and (m := re.fullmatch(r"step-(\d+)(\.tmp)?", d.name))]
    return max(steps, default=None)


def leftovers(run: Path) -> set[str]:
    """Directories a kill left half written, half renamed or half deleted."""
    found = run.glob("checkpoints/*") if (run / "checkpoints").is_dir() else []
    return {p.name for p in found if p.name.endswith((".tmp", ".trash", ".old"))}


def logged_steps(run: Path) -> int:
    return len(RunDir(run).metrics.read_text().splitlines()) if RunDir(run).metrics.is_file() else 0


def resumed_from(log: Path) -> int | None:
    match = re.search(r"resuming from \S+step-(\d+) ", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


# -- 1. crash-safe checkpoints ----------------------------------------------------------------

def test_kill_9_at_random_moments_and_inside_saves(server, tiny_qwen, tmp_path):
    """SIGKILL a run again and again (random moments, then exact points inside a save); after
    every kill every directory marked COMPLETE loads and the next run resumes from the newest
    one; the finished run equals an uninterrupted one bit for bit.

    The learning rate is constant, so the run can be ended wherever the kills left it
    (`--train.max_steps` changed with --allow_config_change) and compared with an
    uninterrupted run of that length, however fast this machine is.
    """
    data, run = data_file(tmp_path), tmp_path / "run"
    rng = random.Random(int(os.environ.get("TUNELAB_KILL_SEED", "8")))
    settings = dict(max_steps=100_000, batch_size=2, micro_batch_size=1, save_every=1, keep_checkpoints=2,
                    schedule="constant", warmup_ratio=0)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    faults = [None] * KILL_TRIALS + [
        {"target": target, "call": rng.randint(1, FAULT_POINTS[target])}
        for target in [list(FAULT_POINTS)[i % len(FAULT_POINTS)] for i in range(SAVE_FAULTS)]]
    expected, mid_save, resumes, checked, unreached = None, 0, 0, 0, 0
    for trial, fault in enumerate(faults):
        log = tmp_path / f"trial-{trial}.log"
        before = leftovers(run)
        pid = server.start(train_argv(tiny_qwen, data, run, **settings), log, fault)
        if fault is None and trial % 2:  # half the random kills land in the training loop
            wait_for(lambda: log.is_file() and "optimizer steps on" in log.read_text(errors="replace"), timeout=60)
        late = False
        try:  # a fault point the run never reaches: killed at a random moment instead
            ended = server.wait(timeout=rng.uniform(0.05, 1.5) if fault is None else 6)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            ended, late = server.wait(timeout=120), True
        if fault:
            unreached += late
            print(f"fault {fault['target']} call {fault['call']}: {'not reached' if late else 'killed there'}")
        assert ended["signal"] == signal.SIGKILL, f"trial {trial} {fault}: {ended}\n{log.read_text()[-3000:]}"
        mid_save += bool(leftovers(run) - before)
        if (started := resumed_from(log)) is not None:
            assert started == expected, f"trial {trial} resumed from {started}, newest complete was {expected}"
            resumes += 1
        for directory in complete_dirs(run):
            assert_loads(directory, base)
            checked += 1
        expected = newest_complete(run) or expected
    assert expected and expected >= 10, f"the kills left only {expected} steps done"

    steps = expected + 5
    log = tmp_path / "final.log"
    done = server.run(train_argv(tiny_qwen, data, run, **{**settings, "max_steps": steps, "save_every": 0})
                      + ["--allow_config_change", "true"], log)
    assert done["exit"] == 0, log.read_text()[-3000:]
    assert resumed_from(log) == expected
    reference = tmp_path / "reference"
    done = server.run(train_argv(tiny_qwen, data, reference, **{**settings, "max_steps": steps, "save_every": 0}),
                      tmp_path / "reference.log")
    assert done["exit"] == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert results(run) == results(reference)
    assert_same_tensors(adapter_tensors(run / "adapter"), adapter_tensors(reference / "adapter"))
    print(f"\nkill -9: {len(faults)} kills ({KILL_TRIALS} at random moments, {SAVE_FAULTS} at a "
          f"fault point inside a save, {unreached} of those not reached and killed at random), "
          f"{mid_save} left a half-written, half-renamed or half-deleted directory, {resumes} resumes "
          f"checked against the newest complete checkpoint, {checked} complete directories loaded; "
          f"{expected} steps survived, final run of {steps} steps bit-identical to an uninterrupted one")


def test_kill_inside_the_final_adapter_save(server, tiny_qwen, tmp_path):
    """The last write of a run: torn adapter file, then SIGKILL. No adapter/, no DONE; the
    rerun redoes the tail from the checkpoint and writes an adapter that loads."""
    data, run = data_file(tmp_path), tmp_path / "run"
    argv = train_argv(tiny_qwen, data, run, max_steps=3, batch_size=2, micro_batch_size=1, save_every=2)
    ended = server.run(argv, tmp_path / "a.log", fault={"target": "safetensors", "call": 2})  # 1: step-2
    assert ended["signal"] == signal.SIGKILL, (tmp_path / "a.log").read_text()[-3000:]
    assert not (run / "adapter").exists() and not RunDir(run).done.exists()
    ended = server.run(argv, tmp_path / "b.log")
    assert ended["exit"] == 0 and resumed_from(tmp_path / "b.log") == 2
    assert_loads(run / "adapter", build_model("qwen2", len(build_tokenizer())))
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_recover_rolls_forward_a_half_done_rename_and_drops_partial_directories(tmp_path):
    """Each state a crash inside write_atomically / remove_tree can leave, built by hand."""
    run = RunDir(tmp_path)

    def directory(path, complete=True):
        path.mkdir(parents=True)
        (path / "weights").write_text("w")
        if complete:
            (path / "COMPLETE").write_text("ok\n")

    directory(run.checkpoints / "step-0000002")
    directory(run.checkpoints / "step-0000003.tmp")  # complete, killed before its rename
    directory(run.checkpoints / "step-0000004.tmp", complete=False)  # killed while filling
    directory(run.checkpoints / "step-0000001.trash")  # killed while pruning
    directory(run.checkpoints / "step-0000005.old")  # not a checkpoint until recover restores it
    directory(tmp_path / "adapter.old")  # killed between `final -> .old` and `.tmp -> final`
    directory(tmp_path / "adapter.tmp")
    (tmp_path / "adapter.tmp" / "weights").write_text("new")
    (tmp_path / "metrics.jsonl.tmp").write_text("{")
    assert [p.name for p in run.complete_checkpoints()] == ["step-0000002"]
    run.recover()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-0000002", "step-0000003", "step-0000005"]
    assert [p.name for p in run.complete_checkpoints()] == ["step-0000002", "step-0000003", "step-0000005"]
    assert (tmp_path / "adapter" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints"]


# -- 4. signals --------------------------------------------------------------------------------

def test_sigterm_saves_prints_the_resume_command_and_it_finishes(server, tiny_qwen, tmp_path):
    """SIGTERM (what schedulers and `docker stop` send); then the printed command, verbatim."""
    data, run = data_file(tmp_path), tmp_path / "run"
    argv = train_argv(tiny_qwen, data, run, max_steps=60, batch_size=2, micro_batch_size=1, save_every=0)
    pid = server.start(argv, tmp_path / "term.log")
    assert wait_for(lambda: logged_steps(run) >= 2, timeout=120)
    os.kill(pid, signal.SIGTERM)
    ended, text = server.wait(), (tmp_path / "term.log").read_text()
    assert ended["exit"] == 128 + signal.SIGTERM, text[-3000:]
    (checkpoint,) = RunDir(run).complete_checkpoints()
    step = int(checkpoint.name.split("-")[1])
    assert metrics(run)[-1]["step"] == step < 60  # the step under way was finished, then saved
    command = re.search(r"Resume with: (.+)", text).group(1)
    assert command == f"tunelab train --config {run / 'config.yaml'}"
    ended = server.run(shlex.split(command)[1:], tmp_path / "resume.log")
    text = (tmp_path / "resume.log").read_text()
    assert ended["exit"] == 0, text[-3000:]
    assert f"resuming from {checkpoint}" in text and RunDir(run).done.exists()
    assert [r["step"] for r in metrics(run)] == list(range(1, 61))


def test_ctrl_c_saves_and_a_second_one_stops_at_once(server, tiny_qwen, tmp_path):
    data, run = data_file(tmp_path), tmp_path / "run"
    argv = train_argv(tiny_qwen, data, run, max_steps=400, batch_size=2, micro_batch_size=1, save_every=3)
    pid = server.start(argv, tmp_path / "int.log")
    assert wait_for(lambda: logged_steps(run) >= 2, timeout=120)
    os.kill(pid, signal.SIGINT)
    ended = server.wait()
    assert ended["exit"] == 128 + signal.SIGINT, (tmp_path / "int.log").read_text()[-3000:]
    assert "Resume with: tunelab train --config" in (tmp_path / "int.log").read_text()
    assert RunDir(run).complete_checkpoints()[-1].name == f"step-{metrics(run)[-1]['step']:07d}"

    # Resumed with 2-second steps; a second Ctrl-C during the step the first one lets finish.
    log = tmp_path / "int2.log"
    pid = server.start(argv, log, fault={"target": "slow_steps", "call": 2000})
    assert wait_for(lambda: log.is_file() and "optimizer steps on" in log.read_text(), timeout=120)
    os.kill(pid, signal.SIGINT)
    assert wait_for(lambda: "finishing step" in log.read_text(), timeout=30)
    os.kill(pid, signal.SIGINT)
    ended, text = server.wait(), log.read_text()
    assert ended["exit"] == 130 and "interrupted" in text and "Resume with" not in text, text[-3000:]
    assert resumed_from(log) is not None
    base = build_model("qwen2", len(build_tokenizer()))
    for directory in complete_dirs(run):
        assert_loads(directory, base)


# -- 5. numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "no clipping"])
def test_nan_gradients_with_a_finite_loss_are_skipped_and_counted(tiny_qwen, tmp_path, monkeypatch, max_grad_norm):
    """The reference failure: the logged loss looks fine, the gradients are NaN."""
    poison(monkeypatch, {2, 3}, "grad")
    run = quick_train(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=6, save_every=1,
                      keep_checkpoints=10, max_grad_norm=max_grad_norm)
    records = metrics(run)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [math.isfinite(r["grad_norm"]) for r in records] == [True, True, False, False, True, True]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert json.loads(RunDir(run).summary.read_text())["skipped_steps"] == 2
    # No checkpoint inside the bad streak; AdamW took 3 steps by step 5 (1, 2 and 5).
    assert [p.name for p in RunDir(run).complete_checkpoints()] == [
        "step-0000001", "step-0000002", "step-0000005", "step-0000006"]
    adam = load_trainer_state(RunDir(run).checkpoints / "step-0000005")["optimizer"]["state"]
    assert {float(s["step"]) for s in adam.values()} == {3.0}
    assert all(torch.isfinite(t).all() for t in adapter_tensors(run / "adapter").values())


@pytest.mark.parametrize("late", [False, True], ids=["loss read at once", "loss read a step late (GPU)"])
def test_nan_loss_is_skipped(tiny_qwen, tmp_path, monkeypatch, late):
    monkeypatch.setattr("tunelab.train.read_late", lambda device: late)
    poison(monkeypatch, {1}, "loss")
    run = quick_train(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=4, save_every=0)
    assert [math.isnan(r["loss"]) for r in metrics(run)] == [False, True, False, False]
    assert [r["skipped_steps"] for r in metrics(run)] == [0, 1, 1, 1]


def test_k_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tiny_qwen, tmp_path, monkeypatch):
    data = data_file(tmp_path)
    with monkeypatch.context() as patch:
        poison(patch, set(range(2, 100)), "grad")
        stopped = r"steps 3-5, all skipped\); the last good checkpoint is \S+step-0000002"
        with pytest.raises(TrainingDiverged, match=stopped):
            quick_train(tiny_qwen, data, tmp_path / "run", max_steps=10, save_every=1, max_bad_steps=3,
                        keep_checkpoints=10)
    rd = RunDir(tmp_path / "run")
    assert [p.name for p in rd.complete_checkpoints()] == ["step-0000001", "step-0000002"]
    assert not rd.adapter.exists() and not rd.done.exists()
    assert_loads(rd.checkpoints / "step-0000002", build_model("qwen2", len(build_tokenizer())))
    quick_train(tiny_qwen, data, tmp_path / "run", max_steps=10, save_every=1, max_bad_steps=3,
                keep_checkpoints=10)
    assert [r["step"] for r in metrics(rd.root)] == list(range(1, 11))  # steps 3-5 redone, not duplicated
    assert metrics(rd.root)[-1]["skipped_steps"] == 0


def test_non_finite_weights_are_never_written(tiny_qwen, tmp_path, monkeypatch):
    base = capture_base(monkeypatch)
    hook = step_hook(monkeypatch)

    def corrupt(step):
        if step == 3:  # a weight goes NaN behind the loop's back
            lora = base["base"].model.layers[0].self_attn.q_proj.lora_A["default"].weight
            with torch.no_grad():
                lora[0, 0] = float("nan")
    hook["on_step"] = corrupt
    with pytest.raises(TrainingDiverged):
        quick_train(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=12, save_every=1,
                    max_bad_steps=4, keep_checkpoints=20)
    from safetensors.torch import load_file

    written = list((tmp_path / "run").rglob("*.safetensors"))
    assert len(written) == 3  # checkpoints 1-3; nothing after the corruption
    assert all(torch.isfinite(t).all() for f in written for t in load_file(str(f)).values())


def test_save_refuses_non_finite_weights_and_keeps_the_previous_checkpoint(tiny_qwen, tmp_path):
    from tunelab.methods import get

    run = quick_train(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=2, save_every=2)
    model = get("lora").load(build_model("qwen2", len(build_tokenizer())), RunDir(run).adapter, True)
    next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("inf"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        save_checkpoint(RunDir(run), 3, model, get("lora"), optimizer, scheduler, {"step": 3}, 2)
    assert [p.name for p in (RunDir(run).checkpoints).iterdir()] == ["step-0000002"]


# -- 6. out of GPU memory (simulated on CPU) ------------------------------------------------------

def fail_above(monkeypatch, rows: int) -> None:
    """Raise CUDA's out-of-memory error for any forward pass over more than `rows` rows."""
    def install(base):
        def pre_hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[0] > rows:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        base.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    capture_base(monkeypatch, install)


def test_out_of_memory_names_the_knobs(tiny_qwen, tmp_path, monkeypatch):
    fail_above(monkeypatch, 2)
    with pytest.raises(OutOfMemory) as raised:
        quick_train(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=2, batch_size=8,
                    micro_batch_size=8)
    message = str(raised.value)
    for knob in ("--train.micro_batch_size 8", "--data.max_length", "--train.gradient_checkpointing",
                 "--train.auto_micro_batch true", "--train.batch_size 8"):
        assert knob in message


def test_auto_micro_batch_halves_until_it_fits_and_learns_the_same(tiny_qwen, tmp_path, monkeypatch, capsys):
    data = data_file(tmp_path)
    reference = quick_train(tiny_qwen, data, tmp_path / "reference", max_steps=4, batch_size=8, micro_batch_size=2)
    fail_above(monkeypatch, 2)
    run = quick_train(tiny_qwen, data, tmp_path / "run", max_steps=4, batch_size=8, micro_batch_size=8,
                      auto_micro_batch=True)
    err = capsys.readouterr().err
    assert "micro_batch_size 8; retrying with 4" in err and "micro_batch_size 4; retrying with 2" in err
    assert results(run) == results(reference)  # same rows a step, same dropout masks
    assert_same_tensors(adapter_tensors(run / "adapter"), adapter_tensors(reference / "adapter"))
    assert json.loads((RunDir(run).complete_checkpoints()[-1] / "state.json").read_text())["micro_batch_size"] == 2


# -- 7. disk full ------------------------------------------------------------------------------

def test_disk_full_mid_save_keeps_the_previous_checkpoint(tiny_qwen, tmp_path, monkeypatch):
    data, calls = data_file(tmp_path), {"n": 0}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the second checkpoint: half a file, then ENOSPC
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        with pytest.raises(DiskFull) as raised:
            quick_train(tiny_qwen, data, tmp_path / "run", max_steps=6, save_every=2)
    message = str(raised.value)
    assert "the disk is full" in message and str(tmp_path / "run" / "checkpoints") in message
    assert "step-0000004" in message and "intact" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    assert_loads(tmp_path / "run" / "checkpoints" / "step-0000002", build_model("qwen2", len(build_tokenizer())))
    quick_train(tiny_qwen, data, tmp_path / "run", max_steps=6, save_every=2)  # space is back
    assert RunDir(tmp_path / "run").done.exists()


def test_disk_full_on_the_cli_is_one_clear_line(tiny_qwen, tmp_path, monkeypatch, capsys):
    import peft.peft_model

    from tunelab.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    with pytest.raises(SystemExit) as exited:
        main(train_argv(tiny_qwen, data_file(tmp_path), tmp_path / "run", max_steps=1, batch_size=2,
                        micro_batch_size=2))
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "error: the disk is full" in err and "Traceback" not in err


# -- 9. bad data -------------------------------------------------------------------------------

def test_bad_data_lists_every_bad_record_and_exits_2(server, tiny_qwen, tmp_path):
    from test_formats import write_bad_fixture

    path, expected = write_bad_fixture(tmp_path)
    log = tmp_path / "bad.log"
    ended = server.run(train_argv(tiny_qwen, path, tmp_path / "run", max_steps=1), log)
    text = log.read_text()
    assert ended["exit"] == 2, text[-3000:]
    for line, _kind, reason in expected:
        assert f"{path}:{line}" in text and reason in text, (line, reason)
    assert "Traceback" not in text and not (tmp_path / "run" / "checkpoints").exists()


def test_fused_optimizer_skips_a_non_finite_step_on_the_device():
    """apply_update: a fused AdamW (what CUDA runs use) skips the update through its found_inf
    input, so the host need not read the loss first; weights, moments and the step count are
    left exactly as they were, and the next finite step updates as if the bad one never came."""
    from tunelab.step import apply_update

    def run(values_seq, fused):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.1, fused=fused)
        for values in values_seq:
            weight.grad = torch.full_like(weight, 0.5)
            apply_update(optimizer, torch.tensor(values))
            optimizer.zero_grad(set_to_none=True)
        return weight.detach().clone(), optimizer.state[weight]

    good, bad = [1.0, 2.0], [float("nan"), 2.0]
    for fused in (True, False):
        clean, clean_state = run([good, good], fused)
        skipped, skipped_state = run([good, bad, [1.0, float("inf")], good], fused)
        assert torch.equal(clean, skipped), fused
        assert float(skipped_state["step"]) == float(clean_state["step"]) == 2.0
        assert torch.equal(clean_state["exp_avg_sq"], skipped_state["exp_avg_sq"])
    assert not torch.equal(run([good], True)[0], run([bad], True)[0])  # the good step did move it
