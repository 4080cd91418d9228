"""Data-parallel training (distributed.py): two processes over gloo learn what one process learns.

`torchrun --nproc_per_node 2 -m tunelab.cli train` on the tiny model (CPU, fp32; LoRA with
dropout 0 on packed rows, and full fine-tuning on padded rows) against an in-process
single-process run with the same global batch: the same losses, held-out loss and adapter within fp32 rounding; metrics written
once; and a checkpoint the two processes wrote resumed by one process finishing on the
single-process weights. The epoch's last step has one row, so one rank has none (it must
join the all-reduce with zero gradients, not hang). A SIGTERM to one rank stops both after
the same step with rank 0's checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults import data_file, metrics, one_thread  # noqa: F401
from tunelab.config import DataConfig, ModelConfig, TrainConfig
from tunelab.data.template import Rendered
from tunelab.distributed import SINGLE, buckets, split_rows
from tunelab.methods import MethodConfig
from tunelab.methods.lora import LoraConfig
from tunelab.train import train

SRC = Path(__file__).resolve().parents[1] / "src"
# 12 rows, 3 held out: 9 train rows at 4 a step are steps of 4, 4 and 1 rows (an epoch).
TRAIN = dict(epochs=1, batch_size=4, micro_batch_size=2, micro_batch_tokens=48, lr=1e-2, save_every=1,
             keep_checkpoints=3, packing="on", seed=3)
VAL_SIZE = 3
ATOL = 1e-5


def rows_of(lengths: list[int]) -> list[Rendered]:
    return [Rendered(list(range(n)), [-100] * n) for n in lengths]


def test_split_balances_tokens_not_rows():
    rows = rows_of([90, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    shares = split_rows(rows, 2)
    loads = [sum(len(r.input_ids) for r in share) for share in shares]
    assert loads == [90, 90]  # by rows it would be 5 and 5: 130 tokens against 50
    assert [len(share) for share in shares] == [1, 9]
    assert sorted(map(id, shares[0] + shares[1])) == sorted(map(id, rows))  # each row exactly once
    assert split_rows(rows, 2) == shares  # deterministic: every rank computes the same split


def test_split_with_fewer_rows_than_ranks_leaves_ranks_empty():
    rows = rows_of([7, 3])
    assert split_rows(rows, 4) == [[rows[0]], [rows[1]], [], []]
    assert split_rows([], 2) == [[], []]
    assert SINGLE.share(rows) is rows  # one process: the step's rows themselves


def test_buckets_keep_order_dtype_and_size():
    tensors = [torch.zeros(100), torch.zeros(100, dtype=torch.bfloat16), torch.zeros(300), torch.zeros(10)]
    grouped = buckets(tensors, limit=1600)  # 400 float32 values
    assert [[t.numel() for t in b] for b in grouped] == [[100, 300], [10], [100]]
    assert all(len({t.dtype for t in b}) == 1 for b in grouped)


METHODS = {  # LoRA on packed rows; full fine-tuning (every weight all-reduced) on padded ones
    "lora": (MethodConfig(name="lora", lora=LoraConfig(dropout=0.0)), ["--method.name=lora", "--method.lora.dropout=0"],
             {}),
    "full": (MethodConfig(name="full"), ["--method.name=full"], {"packing": "off", "lr": 1e-3}),
}


def one_process(model_dir: Path, data: Path, out: Path, name: str = "lora") -> Path:
    method, _, train_overrides = METHODS[name]
    return train(ModelConfig(path=str(model_dir)), DataConfig(path=str(data), val_size=VAL_SIZE), method,
                 TrainConfig(**{**TRAIN, **train_overrides}), out=str(out))


def two_processes(model_dir: Path, data: Path, out: Path, name: str = "lora") -> subprocess.CompletedProcess:
    _, method_flags, train_overrides = METHODS[name]
    flags = [f"--train.{key}={value}" for key, value in {**TRAIN, **train_overrides}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tunelab.cli", "train", f"--model.path={model_dir}", f"--data.path={data}",
               f"--data.val_size={VAL_SIZE}", *method_flags, *flags, f"--out={out}"]
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for file in sorted((run / "adapter").glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=ATOL), \
            f"{key}: max difference {(a[key] - b[key]).abs().max():.2e}"


@pytest.fixture(scope="module", params=list(METHODS))
def runs(request, tiny_qwen, tmp_path_factory):
    """(method, one-process run, two-process run, torchrun's output, data file)."""
    root = tmp_path_factory.mktemp(f"ddp-{request.param}")
    data = data_file(root)
    single = one_process(tiny_qwen, data, root / "single", request.param)
    result = two_processes(tiny_qwen, data, root / "double", request.param)
    return request.param, single, root / "double", result, data


def test_two_processes_learn_what_one_learns(runs):
    name, single, double, result, _ = runs
    mine, theirs = metrics(double), metrics(single)
    assert [r["step"] for r in mine] == [1, 2, 3]  # written once, by rank 0
    for a, b in zip(mine, theirs):
        for key in ("loss", "grad_norm", "val_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert (a["tokens"], a["lr"]) == (b["tokens"], b["lr"])  # the global batch's tokens
    assert "val_loss" in mine[-1]
    assert_close(weights(double), weights(single))
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert summary["learning_checks"]["probe_loss_reloaded"] is not None  # the invariants ran
    assert result.stdout.count("done:") == 1  # rank 1 prints nothing


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tiny_qwen):
    name, single, double, _, data = runs
    step1 = double / "checkpoints" / "step-0000001"
    assert (step1 / "COMPLETE").is_file()
    for later in ("step-0000002", "step-0000003"):  # as if the run had stopped after step 1
        shutil.rmtree(double / "checkpoints" / later)
    shutil.rmtree(double / "adapter")
    (double / "DONE").unlink()
    one_process(tiny_qwen, data, double, name)
    assert [r["step"] for r in metrics(double)] == [1, 2, 3]
    assert_close(weights(double), weights(single))


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (a child of the launcher), if it has started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_qwen, tmp_path):
    """SIGTERM to rank 1 alone: both ranks agree to stop after the same step and rank 0 saves its
    checkpoint (no rank is left waiting in a collective the other never joins)."""
    import signal
    import time

    data = data_file(tmp_path)
    out = tmp_path / "run"
    settings = {**TRAIN, "epochs": 200, "save_every": 0, "check_learning": False}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tunelab.cli", "train", f"--model.path={tiny_qwen}", f"--data.path={data}",
               f"--data.val_size={VAL_SIZE}", "--method.name=lora", "--method.lora.dropout=0",
               *[f"--train.{key}={value}" for key, value in settings.items()], f"--out={out}"]
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(worker_pid(launcher.pid, 1), signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, (len(metrics(out)), stderr[-3000:])
    stopped = [line for line in stderr.splitlines() if "error: stopped by SIGTERM after step" in line]
    assert len(stopped) == 2, stderr[-3000:]  # both ranks, each with the same step
    assert len({line.split("after step")[1].split()[0] for line in stopped}) == 1, stopped
    step = int(stopped[0].split("after step")[1].split()[0])
    assert step < 200 * 3
    (checkpoint,) = sorted((out / "checkpoints").iterdir())
    assert checkpoint.name == f"step-{step:07d}" and (checkpoint / "COMPLETE").is_file()
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
