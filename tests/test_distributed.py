"""Data-parallel training (distributed.py): two processes over gloo learn what one process learns.

`torchrun --nproc_per_node 2 -m tunelab.cli train` on the tiny model (CPU, fp32; LoRA with
dropout 0 on packed rows, replicated and with its base sharded by FSDP2, and full
fine-tuning on padded rows, replicated and sharded) against an in-process single-process
run with the same global batch: the same losses, held-out loss and adapter within fp32
rounding; metrics written once; and a checkpoint the two processes wrote resumed by one
process finishing on the single-process weights (and, sharded, the other way round). The
epoch's last step has one row, so one rank has none (it must join the all-reduce with zero
gradients, or FSDP's collectives with an empty micro-batch, not hang). A sharded save
gathers the trained weights only. A SIGTERM to one rank stops both after the same step with
rank 0's checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults import data_file, metrics, one_thread  # noqa: F401
from tunelab.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from tunelab.data.template import Rendered
from tunelab.distributed import SINGLE, World, buckets, split_rows
from tunelab.methods import MethodConfig, get
from tunelab.methods.freeze import FreezeConfig
from tunelab.methods.full import FullConfig
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


METHODS = {  # LoRA on packed rows; full fine-tuning on padded ones, replicated (ddp) and sharded (FSDP2)
    "lora": (MethodConfig(name="lora", lora=LoraConfig(dropout=0.0)), ["--method.name=lora", "--method.lora.dropout=0"],
             {}),
    "full": (MethodConfig(name="full"), ["--method.name=full"], {"packing": "off", "lr": 1e-3, "distributed": "ddp"}),
    "full-fsdp": (MethodConfig(name="full"), ["--method.name=full"], {"packing": "off", "lr": 1e-3}),  # auto: FSDP2
    "lora-fsdp": (MethodConfig(name="lora", lora=LoraConfig(dropout=0.0)), ["--method.name=lora", "--method.lora.dropout=0"],
                  {"distributed": "fsdp"}),  # the base sharded, the adapter trained
    "pissa-fsdp": (MethodConfig(name="lora", lora=LoraConfig(dropout=0.0, init="pissa")),
                   ["--method.name=lora", "--method.lora.dropout=0", "--method.lora.init=pissa"],
                   {"distributed": "fsdp"}),  # a residual base sharded; saved converted, through stand-ins
    "full-fsdp-frozen": (MethodConfig(name="full", full=FullConfig(train_embeddings=False)),
                         ["--method.name=full", "--method.full.train_embeddings=false"],
                         {"packing": "off", "lr": 1e-3}),  # sharded, its (tied) embeddings frozen
    "freeze-fsdp": (MethodConfig(name="freeze", freeze=FreezeConfig(layers=1)),
                    ["--method.name=freeze", "--method.freeze.layers=1"], {"packing": "off", "lr": 1e-3}),
}
SHARDED = "FSDP2: 2 decoder layers and the root sharded over 2 processes"
UNFUSED = "FSDP2: fused LoRA off for this run"


def one_process(model_dir: Path, data: Path, out: Path, name: str = "lora", **settings) -> Path:
    method, _, train_overrides = METHODS[name]
    return train(ModelConfig(path=str(model_dir)), DataConfig(path=str(data), val_size=VAL_SIZE), method,
                 TrainConfig(**{**TRAIN, **train_overrides, **settings}), out=str(out))


def two_processes(model_dir: Path, data: Path, out: Path, name: str = "lora",
                  entry: tuple = ("-m", "tunelab.cli")) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` of `entry` (the CLI, or a script that wraps it) training `name`."""
    _, method_flags, train_overrides = METHODS[name]
    flags = [f"--train.{key}={value}" for key, value in {**TRAIN, **train_overrides}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *entry, "train", f"--model.path={model_dir}", f"--data.path={data}",
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


@pytest.fixture(scope="module", params=["lora", "full", "full-fsdp", "lora-fsdp"])
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
    assert (SHARDED in result.stdout) == name.endswith("fsdp")  # auto: sharded for full, not for LoRA or ddp
    assert (UNFUSED in result.stdout) == (name == "lora-fsdp")  # replicated LoRA keeps its fused path


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


def test_sharded_freeze_learns_what_one_process_learns(tiny_qwen, tmp_path):
    """Freeze tuning sharded (auto): frozen units (the root, layer 0) next to a trained one;
    only the trained layer is saved, as one process saves it."""
    data = data_file(tmp_path)
    single = one_process(tiny_qwen, data, tmp_path / "single", "freeze-fsdp")
    result = two_processes(tiny_qwen, data, tmp_path / "double", "freeze-fsdp")
    assert SHARDED in result.stdout
    for a, b in zip(metrics(tmp_path / "double"), metrics(single)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-5)
    assert_close(weights(tmp_path / "double"), weights(single))
    assert all(key.startswith("1.") for key in weights(single))  # the trained layer alone


def test_sharded_full_with_frozen_embeddings_saves_them(tiny_qwen, tmp_path):
    """Full fine-tuning sharded with its embeddings frozen: the save is the whole model, so the
    frozen weights are gathered too (not stand-ins) and the saved model is the one-process one."""
    data = data_file(tmp_path)
    single = one_process(tiny_qwen, data, tmp_path / "single", "full-fsdp-frozen")
    result = two_processes(tiny_qwen, data, tmp_path / "double", "full-fsdp-frozen")
    assert SHARDED in result.stdout
    saved, expected = weights(tmp_path / "double"), weights(single)
    assert_close(saved, expected)
    embeddings = next(key for key in expected if "embed_tokens" in key)
    assert saved[embeddings].abs().sum() > 0  # the base's embeddings, not zeros


@pytest.mark.parametrize("name", ["full-fsdp", "lora-fsdp"])
def test_a_one_process_checkpoint_resumes_sharded(tiny_qwen, tmp_path, name):
    """The other way round: a one-process checkpoint (weights, numbered optimizer state)
    resumed by two sharded processes (each keeps its shard of the AdamW moments; for LoRA,
    of the adapter's, next to its shard of the frozen base) finishes on the one-process
    weights."""
    data = data_file(tmp_path)
    single = one_process(tiny_qwen, data, tmp_path / "single", name)
    resumed = tmp_path / "resumed"
    shutil.copytree(single, resumed)
    for later in ("step-0000002", "step-0000003"):
        shutil.rmtree(resumed / "checkpoints" / later)
    shutil.rmtree(resumed / "adapter")
    (resumed / "DONE").unlink()
    result = two_processes(tiny_qwen, data, resumed, name)
    assert SHARDED in result.stdout and "resuming from" in result.stdout
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3]
    assert_close(weights(resumed), weights(single))


GATHERED = """
import os
import torch.distributed.checkpoint.state_dict as state_dict
from tunelab.cli import main

get_model_state_dict = state_dict.get_model_state_dict

def recording(model, *args, **kwargs):  # what each save gathers to rank 0
    weights = get_model_state_dict(model, *args, **kwargs)
    if os.environ["RANK"] == "0":
        print("gathered:", " ".join(sorted(weights)), flush=True)
    return weights

state_dict.get_model_state_dict = recording
main()
"""


def test_sharded_pissa_gathers_only_the_adapter_and_saves_what_one_process_saves(tiny_qwen, tmp_path):
    """PiSSA sharded: a residual base (each rank's SVD of the same weights) under the adapter.
    Every save (each checkpoint, the final adapter) gathers the adapter's tensors alone to rank
    0, never the base's; the final save converts the adapter to a rank-2r LoRA of the untouched
    base on rank 0's plain copy, whose frozen weights are stand-ins, and writes what one
    process writes."""
    from safetensors.torch import load_file

    data = data_file(tmp_path)
    single = one_process(tiny_qwen, data, tmp_path / "single", "pissa-fsdp")
    script = tmp_path / "gathered.py"
    script.write_text(GATHERED)
    double = tmp_path / "double"
    result = two_processes(tiny_qwen, data, double, "pissa-fsdp", entry=(str(script),))
    assert SHARDED in result.stdout and UNFUSED in result.stdout
    gathered = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("gathered:")]
    checkpoints = sorted((double / "checkpoints").iterdir())
    assert len(gathered) == len(checkpoints) + 1  # the checkpoints kept (all of them here), then the adapter
    trained = set(load_file(str(checkpoints[-1] / "adapter" / "adapter_model.safetensors")))  # unconverted
    assert trained and all("lora_" in key for key in trained)
    for keys in gathered:
        assert {key.replace(".default.", ".") for key in keys} == trained
    assert_close(weights(double), weights(single))
    config = json.loads((double / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * LoraConfig().r and config["init_lora_weights"] is True  # converted


POISONED = """
import os, sys
sys.path.insert(0, {tests!r})
import tunelab.train as train_module
from faults import NanGradient
from tunelab.cli import main

current = {{"step": None}}
step_rows, load_model = train_module.step_rows, train_module.load_model

def counting(rows, cfg, step, steps_per_epoch):
    current["step"] = step
    return step_rows(rows, cfg, step, steps_per_epoch)

def poisoned(cfg, device=None):  # rank 1 alone: NaN gradients on step 1, the loss stays finite
    base = load_model(cfg, device)
    if os.environ["RANK"] == "1":
        base.model.norm.register_forward_hook(
            lambda module, args, output: NanGradient.apply(output) if module.training and current["step"] == 1
            else output)
    return base

train_module.step_rows, train_module.load_model = counting, poisoned
main()
"""


def test_a_step_bad_on_one_rank_is_skipped_by_every_rank(tiny_qwen, tmp_path, monkeypatch):
    """NaN gradients on rank 1 alone reach both ranks' shards through the (SUM) reduce-scatter,
    so the global norm is NaN everywhere and both skip the step: the run matches one process
    skipping the same step."""
    from faults import poison

    data = data_file(tmp_path)
    with monkeypatch.context() as patch:
        poison(patch, {1}, "grad")
        single = one_process(tiny_qwen, data, tmp_path / "single", "full-fsdp", save_every=0)
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED.format(tests=str(Path(__file__).parent)))
    result = two_processes(tiny_qwen, data, tmp_path / "double", "full-fsdp", entry=(str(script),))
    assert SHARDED in result.stdout
    assert [r["skipped_steps"] for r in metrics(tmp_path / "double")] == [0, 1, 1]
    assert [r["skipped_steps"] for r in metrics(single)] == [0, 1, 1]
    assert_close(weights(tmp_path / "double"), weights(single))


def test_distributed_flag_is_checked(tiny_qwen, tmp_path):
    """`--train.distributed`: its values, which methods `auto` and `fsdp` shard, and `fsdp` with
    a method that cannot be sharded refused in one process too, before any model is loaded."""
    with pytest.raises(ConfigError, match="`--train.distributed` must be auto, ddp or fsdp"):
        TrainConfig(distributed="zero3")
    with pytest.raises(ConfigError, match="`--train.distributed` must be auto or ddp for --method.name ia3"):
        train(ModelConfig(path=str(tiny_qwen)), DataConfig(path=str(data_file(tmp_path)), val_size=VAL_SIZE),
              MethodConfig(name="ia3"), TrainConfig(**{**TRAIN, "distributed": "fsdp"}), out=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.yaml").exists()
    two, auto, fsdp, ddp = World(rank=0, size=2), TrainConfig(), TrainConfig(distributed="fsdp"), \
        TrainConfig(distributed="ddp")
    assert two.choose(auto, get("full")).fsdp and two.choose(auto, get("freeze")).fsdp
    assert two.choose(fsdp, get("full")).fsdp and two.choose(fsdp, get("lora")).fsdp
    assert not two.choose(auto, get("lora")).fsdp and not two.choose(ddp, get("full")).fsdp  # auto: LoRA replicated
    assert not two.choose(ddp, get("lora")).fsdp
    assert SINGLE.choose(fsdp, get("full")) is SINGLE and SINGLE.choose(fsdp, get("lora")) is SINGLE
    # An out-of-memory retry on one rank alone would desynchronize the sharded collectives.
    with pytest.raises(ConfigError, match="`--train.auto_micro_batch` must be false when full's weights are sharded"):
        two.choose(TrainConfig(auto_micro_batch=True), get("full"))
    with pytest.raises(ConfigError, match="`--train.auto_micro_batch` must be false when lora's weights are sharded"):
        two.choose(TrainConfig(auto_micro_batch=True, distributed="fsdp"), get("lora"))
    assert SINGLE.choose(TrainConfig(auto_micro_batch=True), get("full")) is SINGLE
    assert not two.choose(TrainConfig(auto_micro_batch=True, distributed="ddp"), get("full")).fsdp
    assert not two.choose(TrainConfig(auto_micro_batch=True), get("lora")).fsdp


def test_methods_that_cannot_be_sharded_are_refused_under_fsdp():
    """4-bit bitsandbytes weights, the virtual-token and prefix methods and IA3 declare no
    `shardable`: `--train.distributed fsdp` names the flag and the method, in one process as
    under torchrun, and `auto` / `ddp` replicate them."""
    from tunelab.methods import METHODS

    fsdp = TrainConfig(distributed="fsdp")
    refused = {name for name, method in METHODS.items() if not method.capabilities.shardable}
    assert refused == {"qlora", "ia3", "ptuning", "prompt_tuning", "prefix"}
    for name in refused:
        for world in (SINGLE, World(rank=0, size=2)):
            with pytest.raises(ConfigError, match=rf"`--train.distributed` must be auto or ddp for "
                                                  rf"--method.name {name} \(FSDP2 shards lora, freeze, full;"):
                world.choose(fsdp, get(name))
        for setting in ("auto", "ddp"):
            assert not World(rank=0, size=2).choose(TrainConfig(distributed=setting), get(name)).fsdp


def test_lora_on_an_embedding_layer_is_refused_with_sharded_weights():
    """PEFT saves the base's embedding layer beside an adapter on it; sharded, that frozen
    weight is not gathered, so the combination is refused naming the field."""
    two, fsdp = World(rank=0, size=2), TrainConfig(distributed="fsdp")
    with pytest.raises(ConfigError, match=r"`--method.lora.targets` must be free of lm_head when lora's weights"):
        two.choose(fsdp, get("lora"), options=LoraConfig(targets=["q_proj", "lm_head"]))
    assert two.choose(fsdp, get("lora"), options=LoraConfig()).fsdp
    assert not two.choose(TrainConfig(distributed="ddp"), get("lora"), options=LoraConfig(targets=["lm_head"])).fsdp


def test_the_kl_term_is_refused_with_sharded_weights():
    """`--mitigate.kl` adds a forward with the adapter off on the ranks holding marked rows only,
    which sharded (collective) forwards cannot allow; replicated, it stays."""
    two, fsdp = World(rank=0, size=2), TrainConfig(distributed="fsdp")
    with pytest.raises(ConfigError, match="`--mitigate.kl` must be 0 when lora's weights are sharded over 2"):
        two.choose(fsdp, get("lora"), kl=0.5)
    assert not two.choose(TrainConfig(), get("lora"), kl=0.5).fsdp  # auto: replicated, the KL term kept
    assert SINGLE.choose(fsdp, get("lora"), kl=0.5) is SINGLE
    assert two.choose(fsdp, get("lora"), kl=0.0).fsdp


def test_a_plain_copy_holds_the_trained_weights_and_stand_ins_for_the_frozen_ones(tiny_llama, tmp_path):
    """`fsdp.filled` (what rank 0 writes a sharded save from) given only the trainable tensors
    (as `gathered` gathers them): the frozen base, tied embeddings included, becomes stand-ins
    of one element each, and LoRA's save writes the same adapter as from the live model; a
    trainable tensor missing is an error."""
    from tunelab.fsdp import filled, meta_copy
    from tunelab.methods.lora import apply, save
    from tunelab.models import load_model

    net = apply(load_model(ModelConfig(path=str(tiny_llama))), LoraConfig(dropout=0.0, init="pissa"))
    trainable = {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}
    plain = filled(meta_copy(net), dict(trainable))
    frozen = [(name, p) for name, p in plain.named_parameters(remove_duplicate=False) if not p.requires_grad]
    assert frozen and len(frozen) + len(trainable) == len(list(net.named_parameters(remove_duplicate=False)))
    live = dict(net.named_parameters(remove_duplicate=False))
    for name, p in frozen:
        assert p.device.type == "cpu" and p.shape == live[name].shape and p.dtype == live[name].dtype
        assert p.untyped_storage().nbytes() == p.element_size()  # one element, expanded
    head, embed = plain.get_output_embeddings().weight, plain.get_input_embeddings().weight
    assert head is embed  # still tied
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trainable[name])
    save(net, tmp_path / "live")
    save(plain, tmp_path / "plain")  # PiSSA: converted to a rank-2r LoRA on the plain copy
    assert_close(weights_in(tmp_path / "plain"), weights_in(tmp_path / "live"))
    lora_a = next(name for name in trainable if "lora_A" in name)
    with pytest.raises(RuntimeError, match="the gathered weights lack"):
        filled(meta_copy(net), {k: v for k, v in trainable.items() if k != lora_a})


def weights_in(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


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
    # Searched in the whole stream: the two ranks' lines can land on one line of torchrun's stderr.
    stopped = re.findall(r"error: stopped by SIGTERM after step (\d+) ", stderr)
    assert len(stopped) == 2, stderr[-3000:]  # both ranks, each with the same step
    assert len(set(stopped)) == 1, stopped
    step = int(stopped[0])
    assert step < 200 * 3
    (checkpoint,) = sorted((out / "checkpoints").iterdir())
    assert checkpoint.name == f"step-{step:07d}" and (checkpoint / "COMPLETE").is_file()
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
