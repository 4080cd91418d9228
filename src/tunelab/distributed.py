"""Data-parallel training over several processes (torchrun, accelerate launch), on torch.distributed.

Launched by `torchrun --nproc_per_node N` (or `accelerate launch`, which sets the same
RANK / WORLD_SIZE / LOCAL_RANK variables), every process runs the whole training loop on
its own device (cuda:LOCAL_RANK; the CPU over gloo) with the same weights, the same data
order and the same optimizer state. What is split is each optimizer step's rows:

- `split_rows` deals a step's `batch_size` rows out to the ranks by tokens (the longest
  row first, to the lightest rank), so packed micro-batches cost about the same everywhere;
  a step with fewer rows than ranks leaves some ranks with none.
- Each rank's loss is normalized by the supervised tokens of the whole step (every rank
  knows all the step's rows), so after `World.sum_gradients` (one SUM all-reduce per
  optimizer step, after all micro-batches, in flat buckets over the trainable parameters
  only) every rank holds exactly the single-process gradient of the step. Gradients are
  all-reduced outside any CUDA graph: the graphs produce `param.grad` tensors and the
  reduction writes into them. A rank with no rows contributes zeros.
- Clipping, the NaN guard and the update then see identical values on every rank, so they
  agree without further talk; the loss read back is the all-reduced one.

Whatever is written (checkpoints, adapter, metrics, summary) is written by rank 0 only
(`World.on_main`, which tells the other ranks whether it worked, so an error on rank 0 stops
them too instead of leaving them waiting); a checkpoint holds nothing rank-specific, so a
run resumes on any number of processes. With WORLD_SIZE unset or 1 nothing here does
anything: `SINGLE` hands back what it is given.

Methods that train the base's own weights (`full`, `freeze`) are sharded with FSDP2 instead
of replicated when several processes run them (`--train.distributed auto`, or `fsdp`), and
so is the LoRA family with `fsdp` (its base sharded, its adapter trained): `World.choose`
decides, `World.shard` shards, and the calls above then do what sharding needs (fsdp.py):
the same step, the same checkpoints, 1/N of the memory between steps.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from . import fsdp as sharding
from .config import ConfigError, check
from .models import resolve_device

BUCKET_BYTES = 25 * 2**20
"""Gradients are all-reduced in flat buckets of about this size (DDP's default)."""


class RankFailed(RuntimeError):
    """Rank 0 failed at something every rank waited for (a save, the run directory's checks);
    the other ranks stop with its message."""


def split_rows(rows: list, parts: int, size=lambda row: len(row.input_ids)) -> list[list]:
    """`rows` dealt into `parts` lists of near-equal total `size` (tokens): each row, longest
    first, goes to the lightest part so far (ties: the lower part). Deterministic; a part may
    be empty when there are fewer rows than parts. Every row lands in exactly one part."""
    shares: list[list] = [[] for _ in range(parts)]
    load = [0] * parts
    for index in sorted(range(len(rows)), key=lambda i: (-size(rows[i]), i)):
        lightest = min(range(parts), key=lambda p: (load[p], p))
        shares[lightest].append(rows[index])
        load[lightest] += size(rows[index])
    return shares


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    """cuda:LOCAL_RANK or cpu; None for a single process (the caller resolves it)."""
    control: object = None
    """A gloo group for what the hosts agree on (which gradients exist, a stop signal, rank 0's
    errors) when the main group is NCCL; None: the main group (gloo) itself."""
    fsdp: bool = False
    """The trained weights are sharded with FSDP2 (`choose`), not replicated on every rank."""
    gather_frozen: bool = False
    """Sharded: a save gathers the frozen weights too (the method's `saves_frozen`)."""

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device this process trains on: `device` for one process, else its own."""
        return device if self.size == 1 else self.device

    def share(self, rows: list) -> list:
        """This rank's part of a step's (or the held-out) rows; all of them for one process."""
        return rows if self.size == 1 else split_rows(rows, self.size)[self.rank]

    def choose(self, cfg, method, kl: float = 0.0, options=None) -> "World":
        """`--train.distributed` (of TrainConfig `cfg`) for `method`: this World, with `fsdp` set
        where the weights are to be sharded: several processes and `fsdp` with a method that
        declares `shardable` (full, freeze, the LoRA family), or `auto` with a method that trains
        the base's own weights (their gradients and AdamW moments are what fills a card; an
        adapter's are small, so `auto` replicates it). `fsdp` with a method that cannot be
        sharded is refused even in one process, so the setting fails where it is first tried,
        not under torchrun only. `kl`: the run's `--mitigate.kl`; `options`: the method's own
        settings (LoRA's `targets`)."""
        from .methods import METHODS

        shardable = ", ".join(name for name, m in METHODS.items() if m.capabilities.shardable)
        check(cfg.distributed != "fsdp" or method.capabilities.shardable, "train.distributed",
              f"auto or ddp for --method.name {method.name} (FSDP2 shards {shardable}; {method.name} "
              f"declares no `shardable`, so its model is replicated)", cfg.distributed)
        own = method.capabilities.adapter_kind == "whole_model"
        if self.size == 1 or cfg.distributed == "ddp" or (cfg.distributed == "auto" and not own):
            return self
        # Sharded, every forward and backward is collective layer by layer: a rank that retried
        # a step with a smaller micro-batch would issue other collectives than the ranks waiting.
        check(not cfg.auto_micro_batch, "train.auto_micro_batch",
              f"false when {method.name}'s weights are sharded over {self.size} processes (FSDP2, "
              f"--train.distributed {cfg.distributed}); or keep it with --train.distributed ddp", True)
        # The KL term runs a second forward (the adapter off) on the ranks that hold marked rows
        # only: their all-gathers would not line up with those of the ranks that hold none.
        check(kl == 0, "mitigate.kl", f"0 when {method.name}'s weights are sharded over {self.size} "
              f"processes (FSDP2, --train.distributed {cfg.distributed}); or keep it with "
              f"--train.distributed ddp", kl)
        # LoRA on an embedding layer makes PEFT save the base's embedding layer with the adapter
        # (PEFT's own test: a name of its list in `target_modules`), a frozen weight that a
        # sharded save leaves on the other ranks (fsdp.gathered).
        from peft.utils.other import EMBEDDING_LAYER_NAMES

        targets = getattr(options, "targets", None) or []
        embedding = [name for name in EMBEDDING_LAYER_NAMES if name in targets]
        check(not embedding, f"method.{method.name}.targets", f"free of {', '.join(embedding)} when "
              f"{method.name}'s weights are sharded (FSDP2; PEFT would save the base's embedding layer, "
              f"which stays sharded); or keep it with --train.distributed ddp", targets)
        return replace(self, fsdp=True, gather_frozen=method.capabilities.saves_frozen)

    def shard(self, net: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Shard `net` with FSDP2 when `fsdp` (after `broadcast`: every rank shards rank 0's
        weights); returns the trainable parameters the optimizer is to hold: `params` themselves
        unless sharded."""
        return sharding.shard(net, self.device, self.size) if self.fsdp else params

    def plain(self, value: torch.Tensor) -> torch.Tensor:
        """A replicated DTensor (the norm of sharded gradients) as the tensor it is on every rank."""
        return value.to_local() if self.fsdp and sharding.is_sharded(value) else value

    # -- collectives (every rank must call each one, in the same order) ----------------------
    def micro_batches(self, rows: list, make) -> list[dict]:
        """`make(this rank's share of rows)`: its micro-batches. Sharded, every forward is
        collective, so every rank runs as many as the rank with the most: the others add
        copies of the step's shortest row with no supervised token (loss 0, zero gradients)."""
        mine = make(self.share(rows))
        if not self.fsdp:
            return mine
        import torch.distributed as dist

        most = torch.tensor([len(mine)], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.control)  # a host fact, agreed on the host
        if int(most) > len(mine):
            spare = sharding.idle(make([min(rows, key=lambda row: len(row.input_ids))])[0])
            mine = mine + [spare] * (int(most) - len(mine))
        return mine

    def sync_gradients(self, net: torch.nn.Module, last: bool) -> None:
        """Before each backward of a step: sharded, gradients are reduced after the `last` one
        only (the others accumulate locally); replicated, `sum_gradients` reduces them after."""
        if self.fsdp:
            sharding.sync_gradients(net, last)

    def sum_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """SUM-all-reduce the step's gradients of `params` (in place, in flat buckets) and its
        `loss`; returns the summed loss. A parameter without a gradient on any rank keeps
        none (as in one process); one that has a gradient somewhere gets zeros elsewhere.
        Sharded parameters are skipped: FSDP has reduce-scattered their gradients (as a SUM)."""
        if self.size == 1:
            return loss
        import torch.distributed as dist

        if self.fsdp:
            params = [p for p in params if not sharding.is_sharded(p)]
        reduced = []
        if params:
            # Which parameters have a gradient on some rank: host facts, agreed on the host (gloo),
            # so the step never waits for the device here and every rank's buckets line up.
            present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
            dist.all_reduce(present, group=self.control)
            reduced = [p for p, count in zip(params, present.tolist()) if count]
        for p in reduced:
            if p.grad is None:  # this rank had no rows, or none that reached `p`
                p.grad = torch.zeros_like(p)
        summed = loss.detach().float().reshape(1).clone()  # rides along with the last bucket
        for bucket in buckets([p.grad for p in reduced] + [summed]):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            unflatten_into(bucket, flat)
        return summed.reshape(())

    def sum(self, *values: float) -> list[float]:
        """The SUM of each value over the ranks (one all-reduce)."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank (in place), e.g. freshly initialized weights."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for bucket in buckets(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            dist.broadcast(flat, 0)
            with torch.no_grad():
                unflatten_into(bucket, flat)

    def write(self, work, net: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
              what: str = "rank 0"):
        """`on_main(lambda: work(model, optimizer))`, with the model and optimizer as one process
        has them: `net` and `optimizer` themselves unless sharded; sharded, their full state
        gathered to rank 0's CPU in a plain copy of the model and an optimizer stand-in
        (fsdp.gathered; every rank takes part), dropped again once written."""
        if not self.fsdp:
            return self.on_main(lambda: work(net, optimizer), what)
        with sharding.gathered(net, optimizer, self.main, frozen=self.gather_frozen) as whole:
            return self.on_main(lambda: work(*whole()), what)

    def load_optimizer(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """A checkpoint's optimizer state (the one-process layout) into `optimizer`: sharded,
        each rank keeps its shard of rank 0's values."""
        if self.fsdp:
            sharding.load_optimizer(net, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def agreed_signal(self, signum: int | None) -> int | None:
        """A stop signal any rank has received (torchrun forwards SIGTERM to every process, but
        not at one instant), so all ranks stop after the same step. The caller keeps its own
        flag apart from the answer: a signal that arrives during this call is agreed next step."""
        if self.size == 1:
            return signum
        import torch.distributed as dist

        flag = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag) or None

    def on_main(self, work, what: str = "rank 0"):
        """Run `work()` on rank 0 only (writing files); every rank waits for it, and an error
        there stops the other ranks too (`RankFailed`, naming it), so none is left waiting at
        the next collective. Returns `work()`'s result on rank 0, None elsewhere."""
        if self.size == 1:
            return work()
        import torch.distributed as dist

        result, failure = None, None
        if self.main:
            try:
                result = work()
            except BaseException as err:
                failure = err
        message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(message, 0, group=self.control)
        if failure is not None:
            raise failure
        if message[0] is not None:
            raise RankFailed(f"{what} failed on rank 0, so rank {self.rank} stops too: {message[0]}")
        return result

    @contextmanager
    def claimed(self, run):
        """`run.claim()` (the directory checks and its lock) held by rank 0 for the whole run;
        the others wait for it, and stop with its error if it is refused."""
        if self.size == 1:
            with run.claim() as lock:
                yield lock
            return
        lock = self.on_main(run.claim, f"claiming {run.root}")
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()

    @contextmanager
    def quiet(self):
        """Silence print() on ranks other than 0 (their errors and warnings still show)."""
        if self.main:
            yield
            return
        from contextlib import redirect_stdout

        with open(os.devnull, "w") as sink, redirect_stdout(sink):
            yield

    def seed_dropout(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own random stream (dropout masks), so the ranks do not
        drop the same positions of different rows; rank 0 keeps the stream a checkpoint saves."""
        if self.size > 1 and not self.main:
            torch.manual_seed(seed + 1_000_003 * self.rank + step)


SINGLE = World()
"""One process: every method hands back what it is given."""

_CURRENT: list[World] = [SINGLE]


def buckets(tensors: list[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """`tensors` grouped by dtype and device into lists of about `limit` bytes, in order."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    size: dict[tuple, int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or size[key] + nbytes > limit and groups[key][-1]:
            groups.setdefault(key, []).append([])
            size[key] = 0
        groups[key][-1].append(t)
        size[key] += nbytes
    return [bucket for lists in groups.values() for bucket in lists]


def unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the consecutive parts of `flat` back into `tensors` (one foreach copy, not one
    kernel launch per tensor: a LoRA on a 1.5B model has ~400 gradient tensors)."""
    parts = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(parts, tensors)])


def leave() -> None:
    """At exit: free what still refers to the process group, then destroy it, while the
    interpreter still runs. A sharded model's FSDP state sits in reference cycles that hold
    the group; left to the interpreter's final collection, the group's gloo worker threads
    outlive Python, and one still releasing a finished collective's tensors (which needs the
    GIL) is killed mid-C++: `terminate called without an active exception` after the run
    (gdb: ProcessGroupGloo::AsyncWork's destructor on a gloo thread during Py_FinalizeEx). On
    two busy CPU cores: 4 of ~70 sharded runs before this collection, 0 of 70 after."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started as one of several (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> World:
    """The World `init` set up in this process (SINGLE before it, or for one process)."""
    return _CURRENT[0]


def init(device_name: str = "auto") -> World:
    """Join the process group torchrun set up the environment for, once per process (nccl on
    CUDA, gloo on the CPU); SINGLE when WORLD_SIZE is unset or 1."""
    if not launched():
        return SINGLE
    if current() is not SINGLE:
        return current()
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    kind = resolve_device(device_name).type
    if kind == "cuda":
        if ":" in device_name:
            raise ConfigError(f"`--model.device {device_name}` names one card, but under torchrun each of "
                              f"the {size} processes trains on its own (cuda:LOCAL_RANK): use --model.device "
                              f"auto or cuda, and CUDA_VISIBLE_DEVICES to choose the cards")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {rank} has LOCAL_RANK {local_rank}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s): start at most that many "
                              f"processes a host (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif kind == "cpu":
        device = torch.device("cpu")
    else:
        raise ConfigError(f"`--model.device {device_name}`: several processes train on CUDA or the CPU "
                          f"only, not {kind}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                **({"device_id": device} if kind == "cuda" else {}))
        atexit.register(leave)
    control = dist.new_group(backend="gloo") if kind == "cuda" else None
    _CURRENT[0] = World(rank, size, local_rank, device, control)
    return _CURRENT[0]
