"""Runtime invariants: a training path that does not learn stops the run before it saves.

Every speed lever (fused LoRA, packing, varlen attention, CUDA graphs, compile) computes
what plain PEFT computes, on paper. A bug in one of them once trained against stale weights
with no error, 0 skipped steps and a saved adapter that wrecked the model. So `train()` holds
each run to three facts, on a small fixed probe batch (up to 8 held-out rows, else training
rows), at a cost of a few forwards of 8 rows per evaluation:

1. After the first applied optimizer step some trainable weight has changed.
2. At every held-out evaluation and checkpoint, the training path's probe loss equals the
   probe loss of plain PEFT's forward on the same weights (each row alone, no fusion, no
   packing, the model's own attention, no compiled code) within `tolerance`, and it has
   moved from its value before the first step.
3. After the final save, the adapter loaded the way `chat`, `eval` and `merge` load it
   (`runs.load_run` into a `generate.Engine`) gives the training-time probe loss again.

A broken invariant raises `InvariantBroken`, naming the numbers and the settings to try.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .accel import plain_forward
from .data.template import IGNORE, Rendered
from .generate import Engine
from .runs import load_run

PROBE_ROWS = 8


class InvariantBroken(RuntimeError):
    """The training path stopped computing what plain PEFT computes; nothing was saved after it."""


def tolerance(dtype: torch.dtype, loss: float) -> float:
    """How far two ways of computing one mean token loss may differ: fp32 rounding, or half
    precision's (varlen FlashAttention against SDPA, a fused against a plain projection: 0.07
    at most per token on a 1.5B model in bf16, far less in a mean over rows)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 0.05 + 0.01 * abs(loss)
    return 1e-3 + 1e-4 * abs(loss)


def probe_rows(val: list[Rendered], train: list[Rendered]) -> list[Rendered]:
    """Up to `PROBE_ROWS` rows, evenly spaced over the held-out split (else the training rows)."""
    rows = val or train
    step = max(1, len(rows) // PROBE_ROWS)
    return [r for r in rows[::step] if any(x != IGNORE for x in r.labels[1:])][:PROBE_ROWS]


@torch.no_grad()
def plain_loss(net: torch.nn.Module, rows: list[Rendered], device, autocast) -> float:
    """Mean loss per supervised token of `rows` through the model's own forward, one row at a
    time (no padding), logits of the row's own positions (virtual tokens dropped)."""
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    try:
        for row in rows:
            ids = torch.tensor([row.input_ids], device=device)
            labels = torch.tensor(row.labels[1:], device=device)
            with autocast:
                logits = net(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            logits = logits[0, -ids.shape[1]:-1].float()
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    finally:
        net.train(was_training)
    return total / max(count, 1)


def weight_sample(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A few elements of every trainable tensor (enough to see an update, cheap to keep)."""
    return [p.detach().reshape(-1)[:256].float().clone() for p in params]


@dataclass
class Invariants:
    """The checks of one run (see the module docstring); `training_loss` is the training
    path's mean probe loss (`train.evaluate_loss` on the probe rows)."""
    net: torch.nn.Module
    fast: object
    rows: list[Rendered]
    training_loss: object  # (rows) -> float
    device: torch.device
    autocast: object
    dtype: torch.dtype
    start: float | None = None
    params: list = field(default_factory=list)
    sample: list = field(default_factory=list)
    changed: bool = False
    last: dict = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time spent in these checks so far (their cost, reported in summary.json)."""

    def _training_loss(self) -> float:
        was_training = self.net.training
        try:
            try:
                return self.training_loss(self.rows)
            except torch.cuda.OutOfMemoryError:  # memory is short (the run will shrink its micro-batch)
                pass
            supervised = [max(r.num_supervised, 1) for r in self.rows]
            return sum(self.training_loss([r]) * n for r, n in zip(self.rows, supervised)) / sum(supervised)
        finally:
            self.net.train(was_training)

    def before_training(self, params: list[torch.nn.Parameter]) -> None:
        started = time.perf_counter()
        self.start = self._training_loss()
        self.sample = weight_sample(params)
        self.params = params
        self.seconds += time.perf_counter() - started

    def after_step(self) -> None:
        """Invariant 1, once: call after each applied (finite) step."""
        if self.changed:
            return
        started = time.perf_counter()
        now = weight_sample(self.params)
        if all(torch.equal(a, b) for a, b in zip(self.sample, now)):
            raise InvariantBroken(
                "the first optimizer step changed no trainable weight (its gradients were all zero "
                "or the optimizer does not reach the trained tensors); nothing was saved. Check "
                "--train.lr and the method's target modules")
        self.changed = True
        self.sample = self.params = []
        self.seconds += time.perf_counter() - started

    def check(self, step: int, applied_steps: int) -> dict:
        """Invariant 2: the training path against plain PEFT on the same weights, and moved."""
        started = time.perf_counter()
        mine = self._training_loss()
        with plain_forward(self.net, self.fast):
            plain = plain_loss(self.net, self.rows, self.device, self.autocast)
        allowed = tolerance(self.dtype, plain)
        self.seconds += time.perf_counter() - started
        self.last = {"step": step, "probe_loss_training_path": round(mine, 6),
                     "probe_loss_plain_peft": round(plain, 6), "probe_tolerance": round(allowed, 6)}
        if not math.isfinite(mine) and not math.isfinite(plain):
            return self.last  # non-finite weights: the NaN guard's business, not a lever's
        if not abs(mine - plain) <= allowed:
            raise InvariantBroken(
                f"at step {step} the training path's loss on {len(self.rows)} probe rows is {mine:.4f} "
                f"but plain PEFT's forward on the same weights gives {plain:.4f} (allowed difference "
                f"{allowed:.4f}): a speed lever computes something else, so the run stopped before "
                f"saving. Retry with --train.cuda_graphs false, --train.packing off or "
                f"--train.kernels torch to find which, and report it")
        if applied_steps and mine == self.start:
            raise InvariantBroken(
                f"after {applied_steps} applied optimizer steps the training path's probe loss is "
                f"still exactly its value before training ({mine:.6f}): the forward does not see "
                f"the updated weights, so the run stopped before saving")
        return self.last

    def reloaded(self, run_root, device) -> dict:
        """Invariant 3: the saved adapter, loaded as chat/eval/merge load it, gives the
        training-time probe loss. Call after the training model is freed (one model in memory)."""
        started = time.perf_counter()
        model, tokenizer, _ = load_run(run_root, device)
        engine = Engine(model, tokenizer, device)
        total, count = 0.0, 0
        for row in self.rows:
            ids = torch.tensor([row.input_ids])
            logits = engine.forward(ids, torch.ones_like(ids))[0, :-1].float()
            labels = torch.tensor(row.labels[1:], device=logits.device)
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
        del engine, model
        reloaded = total / max(count, 1)
        trained = self.last.get("probe_loss_training_path")
        self.seconds += time.perf_counter() - started
        result = dict(self.last, probe_loss_reloaded=round(reloaded, 6), seconds=round(self.seconds, 3))
        if trained is not None and not abs(reloaded - trained) <= tolerance(self.dtype, trained):
            raise InvariantBroken(
                f"the saved adapter, loaded as chat and eval load it, gives a probe loss of "
                f"{reloaded:.4f}, but training ended at {trained:.4f}: what was saved is not what "
                f"was trained")
        return result
