"""One optimizer step, as `train()` runs it and the benchmarks time it: the step's rows, their
micro-batches, the loss (the mean over every supervised token of the step, so accumulation
and micro-batch size do not change what is learned), backward, the gradients summed over
ranks, clipping, an update that skips a non-finite step without the host waiting, the
step's loss read back one step late on a GPU, and the held-out loss.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from . import accel, mitigate as mitigation
from .accel import FastPath
from .config import TrainConfig
from .data import Rendered
from .distributed import SINGLE, World


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the settings that use less."""


def step_rows(rows: list[Rendered], cfg: TrainConfig, step: int, steps_per_epoch: int) -> list[Rendered]:
    """Rows of optimizer step `step`: a fixed permutation per epoch, so a resumed run sees
    exactly the rows an uninterrupted one would."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    return [rows[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]


def smaller_micro_batch(cfg: TrainConfig, packed: bool, longest: int, why: str, step: int,
                        device: torch.device, max_length: int) -> TrainConfig:
    """After a CUDA out-of-memory error: `cfg` with half the micro-batch when
    --train.auto_micro_batch is on (the optimizer step keeps its `batch_size` rows through
    accumulation, so what is learned does not change), else OutOfMemory naming the knobs."""
    if packed:
        smaller = {"micro_batch_tokens": max(longest, cfg.micro_batch_tokens // 2)}
        possible = cfg.micro_batch_tokens > longest
    else:  # the largest divisor of batch_size at most half the current size
        size = max((d for d in range(1, cfg.micro_batch_size // 2 + 1) if cfg.batch_size % d == 0), default=1)
        smaller, possible = {"micro_batch_size": size}, cfg.micro_batch_size > 1
    if not (cfg.auto_micro_batch and possible):
        raise OutOfMemory(out_of_memory_message(cfg, packed, longest, why, step, max_length))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name, value = next(iter(smaller.items()))
    print(f"out of memory at step {step + 1} with --train.{name} {getattr(cfg, name)}; "
          f"retrying with {value} (--train.auto_micro_batch)", file=sys.stderr, flush=True)
    return replace(cfg, **smaller)


def out_of_memory_message(cfg: TrainConfig, packed: bool, longest: int, why: str, step: int,
                          max_length: int) -> str:
    held = (f"--train.micro_batch_tokens {cfg.micro_batch_tokens} packed tokens" if packed
            else f"--train.micro_batch_size {cfg.micro_batch_size} rows")
    return (f"out of GPU memory at step {step + 1} ({why}). Each forward pass holds {held}, "
            f"rows up to {longest} tokens (--data.max_length {max_length}). To use less memory: "
            f"lower {held.split()[0]} (the optimizer step keeps --train.batch_size {cfg.batch_size} "
            f"rows through gradient accumulation), lower --data.max_length, set "
            f"--train.gradient_checkpointing true, or let tunelab halve the micro-batch until it "
            f"fits: --train.auto_micro_batch true. Checkpoints already saved are intact; run the "
            f"same command to resume")


def micro_batches(rows: list[Rendered], cfg: TrainConfig, fast: FastPath) -> list[dict]:
    """Model inputs for one step's rows: packed within `micro_batch_tokens`, or padded
    `micro_batch_size` rows at a time (sorted by length: less padding, same gradient). Rows
    marked for the KL-to-base term go in micro-batches of their own (mitigate.py)."""
    return mitigation.kl_micro_batches(rows, fast, cfg.micro_batch_size, cfg.micro_batch_tokens)


def token_loss_sum(net, batch: dict, fast: FastPath, device, autocast) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of one micro-batch (accel/loss.py), plus
    the KL-to-base term where the micro-batch carries one (mitigate.py)."""
    if "kl" in batch:
        return mitigation.loss_sum_with_kl(net, batch, fast.loss, device, autocast)
    return accel.token_loss_sum(net, batch, fast.loss, device, autocast)


def optimizer_step(net, rows, cfg, fast: FastPath, device, autocast, params,
                   world: World = SINGLE) -> tuple[float, int, float]:
    """Forward/backward every micro-batch of one step; (mean loss, tokens, grad norm)."""
    values, tokens = queue_step(net, rows, cfg, fast, device, autocast, params, world)
    loss, grad_norm = values.tolist()
    return loss, tokens, grad_norm


def queue_step(net, rows, cfg, fast: FastPath, device, autocast, params,
               world: World = SINGLE) -> tuple[torch.Tensor, int]:
    """`optimizer_step` without reading anything back: ([mean loss, grad norm] on the device,
    tokens). The host queues the work and goes on. Under several processes `rows` are the
    whole step's, this rank computes its share (`world.share`) and the gradients and loss are
    summed over the ranks before clipping (`world.sum_gradients`): the step's own."""
    supervised = sum(r.num_supervised for r in rows)
    tokens = sum(len(r.input_ids) for r in rows)
    total = torch.zeros((), device=device)
    batches = world.micro_batches(rows, lambda share: micro_batches(share, cfg, fast))
    for index, batch in enumerate(batches):
        world.sync_gradients(net, index == len(batches) - 1)
        loss = (fast.graphs.run(batch, 1 / supervised, alone=len(batches) == 1)  # CUDA graph replay
                if fast.graphs else None)
        if loss is None:
            loss = token_loss_sum(net, batch, fast, device, autocast) / supervised
            loss.backward()
        total += loss.detach()  # no .item() per micro-batch: the host never waits mid-step
    total = world.sum_gradients(params, total)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = world.plain(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return torch.stack([total.float(), grad_norm.float()]), tokens


class Readback:
    """A step's [loss, grad norm], copied to pinned host memory as soon as the GPU has them.

    Reading it waits for that step only. `values.tolist()` would queue its copy behind all
    the work queued since, so the host would wait for the next step too, and the GPU would
    then idle while the host prepares the step after (measured with `bench/throughput.py
    --profile`: docs/PERFORMANCE.md).
    """

    def __init__(self, values: torch.Tensor):
        self.ready = None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = values.detach().clone()

    def tolist(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def read_late(device: torch.device) -> bool:
    """Whether a step's loss is read after the next step is queued: on a GPU, where reading
    it at once would leave the card idle while the host prepares the next step."""
    return device.type == "cuda"


def apply_update(optimizer: torch.optim.Optimizer, values: torch.Tensor) -> None:
    """`optimizer.step()` unless the step's loss or gradient norm (`values`) is not finite.

    A fused optimizer decides on the device, through the `found_inf` input it takes from a
    GradScaler (its update and its step count are left as they were), so the host does not
    wait for the step to finish; any other optimizer reads the values first.
    """
    bad = (~torch.isfinite(values).all()).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bad.item():
        optimizer.step()


@torch.no_grad()
def evaluate_loss(net, rows: list[Rendered], cfg: TrainConfig, fast: FastPath, device, autocast,
                  world: World = SINGLE) -> float:
    """Mean loss per supervised token over `rows` (under several processes each rank takes
    its share and the sums are added up)."""
    net.eval()
    total = torch.zeros((), device=device)
    for batch in world.micro_batches(rows, lambda share: micro_batches(share, cfg, fast)):
        total += token_loss_sum(net, batch, fast, device, autocast)
    return world.sum(total.item())[0] / max(sum(r.num_supervised for r in rows), 1)
