"""CUDA-graph replay of packed training micro-batches: the step without the launch overhead.

A LoRA step issues tens of thousands of PyTorch operations (every adapter adds a dozen
small ones per projection) for a few thousand tokens, so eager mode spends most of the step
launching kernels, not running them (docs/PERFORMANCE.md). `GraphedSteps` captures the forward and backward of
one packed micro-batch as a CUDA graph and replays it: one launch instead of thousands.

A graph needs fixed shapes, so each micro-batch is padded up to buckets (tokens to a
multiple of 128, supervised positions to 512, row boundaries to 16 entries, the longest
row to 128). The padding is one extra row of pad tokens that attends only to itself and has
no loss; real tokens compute exactly what the eager packed path computes. One graph is
captured per bucket the first time it occurs (two eager warmup passes + the capture); all
graphs share one memory pool. Gradients come out of the graph as static tensors: a step of
one micro-batch uses them as `param.grad` directly, a step of several copies the first and
adds the rest, so the optimizer, clipping and `zero_grad` work as usual. If a capture fails,
the run says why and continues eagerly.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from ..data.template import IGNORE
from .kernels.cross_entropy import linear_cross_entropy
from .loss import with_prompt

TOKEN_BUCKET, SUPERVISED_BUCKET, BOUNDARY_BUCKET, LENGTH_BUCKET = 128, 512, 16, 128


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class GraphedSteps:
    """Forward + backward of packed micro-batches through `trunk` and `head`, as CUDA graphs."""

    def __init__(self, net: torch.nn.Module, plan, params: list[torch.nn.Parameter], pad_id: int, autocast):
        self.net, self.plan, self.params = net, plan, params
        self.trunk, self.head = plan.trunk, plan.head
        self.pad_id = pad_id
        # cached weight casts would be allocated inside the graph and freed after it
        self.autocast = (torch.autocast("cuda", dtype=autocast.fast_dtype, cache_enabled=False)
                         if isinstance(autocast, torch.autocast) else nullcontext())
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.failed: str | None = None
        self.replays = 0

    # -- inputs -----------------------------------------------------------------------
    def host_inputs(self, batch: dict) -> tuple[tuple, dict]:
        """(graph key, bucketed host tensors) of a packed micro-batch; host-only work."""
        ids, positions = batch["input_ids"][0], batch["position_ids"][0]
        labels, cu = batch["labels"][0], batch["cu_seq_lens_q"]
        tokens = ids.numel()
        padded = _round_up(tokens, TOKEN_BUCKET)
        extra = padded - tokens
        if extra:  # one more row, of pad tokens, with no loss
            ids = torch.cat([ids, ids.new_full((extra,), self.pad_id)])
            positions = torch.cat([positions, torch.arange(extra, dtype=positions.dtype)])
            labels = torch.cat([labels, labels.new_full((extra,), IGNORE)])
            cu = torch.cat([cu, cu.new_tensor([padded])])
        boundaries = _round_up(cu.numel(), BOUNDARY_BUCKET)
        cu = torch.cat([cu, cu.new_full((boundaries - cu.numel(),), padded)])  # empty rows
        longest = _round_up(max(batch["max_length_q"], extra), LENGTH_BUCKET)
        where = (labels != IGNORE).nonzero().squeeze(1)
        supervised = min(_round_up(max(where.numel(), 1), SUPERVISED_BUCKET), padded)
        fill = supervised - where.numel()
        host = {
            "input_ids": ids[None], "position_ids": positions[None], "cu_seqlens": cu.to(torch.int32),
            "positions": torch.cat([where, where.new_full((fill,), padded - 1)]),
            "targets": torch.cat([labels[where], labels.new_zeros(fill)]),
            "row_weights": torch.cat([torch.ones(where.numel()), torch.zeros(fill)]),
        }
        return (padded, boundaries, longest, supervised, self.net.training), host

    # -- the captured computation -------------------------------------------------------
    def _body(self, static: dict, longest: int):
        # Fused LoRA's compute copies are rebuilt by the forward itself (`lora.py`), so the
        # capture holds that rebuild and every replay reads the weights the optimizer left.
        with self.autocast:
            inputs = {"input_ids": static["input_ids"], "position_ids": static["position_ids"]}
            if self.plan.prefix:  # virtual tokens (P-Tuning, prompt tuning) at each row's start
                inputs = with_prompt(self.plan, inputs)
            hidden = self.trunk(**inputs, cu_seq_lens_q=static["cu_seqlens"], cu_seq_lens_k=static["cu_seqlens"],
                                max_length_q=longest, max_length_k=longest, use_cache=False).last_hidden_state
            hidden = hidden[0].index_select(0, static["positions"])
            loss = linear_cross_entropy(hidden, self.head.weight, static["targets"], self.head.bias,
                                        static["row_weights"], self.plan.triton_cross_entropy) * static["scale"]
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), grads

    def _capture(self, key: tuple, static: dict):
        longest = key[2]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm up: lazy initialisation, allocator, library handles. Its dropout draws must not
        # advance the global RNG: a resumed run captures at other steps than the first run did.
        with torch.cuda.stream(side), torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            for _ in range(2):
                self._body(static, longest)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss, grads = self._body(static, longest)
        return graph, loss, grads

    # -- one micro-batch ----------------------------------------------------------------
    def run(self, batch: dict, scale: float, alone: bool = False) -> torch.Tensor | None:
        """Loss * scale of a packed micro-batch, its gradients added to `param.grad`;
        None when graphs are off for this run (the caller runs the step eagerly). `alone`:
        the step's only micro-batch, so `param.grad` may be the graph's own gradient output
        (no copy; the next replay, after this step's update, overwrites it)."""
        if self.failed:
            return None
        key, host = self.host_inputs(batch)
        device = self.params[0].device
        if key not in self.graphs:
            static = {name: t.to(device) for name, t in host.items()}
            static["scale"] = torch.tensor(scale, device=device)
            try:
                graph, loss, grads = self._capture(key, static)
            except torch.cuda.OutOfMemoryError:
                raise  # the trainer's out-of-memory handling shrinks the micro-batch and retries
            except Exception as err:  # noqa: BLE001 - any other capture failure: say so, go eager
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"CUDA graph capture failed ({self.failed}); training continues eagerly")
                torch.cuda.synchronize()
                return None
            self.graphs[key] = (graph, static, loss, grads)
        graph, static, loss, grads = self.graphs[key]
        for name, tensor in host.items():  # from pinned memory: the host does not wait for the GPU
            static[name].copy_(tensor.pin_memory(), non_blocking=True)
        static["scale"].fill_(scale)
        graph.replay()
        self.replays += 1
        pairs = [(p, g) for p, g in zip(self.params, grads) if g is not None]
        fresh = [p for p, _ in pairs if p.grad is None]
        if alone and len(fresh) == len(pairs):  # the usual case: a step of one micro-batch
            for p, g in pairs:
                p.grad = g
        elif len(fresh) == len(pairs):  # the first micro-batch of a step
            for (p, _), copy in zip(pairs, torch._foreach_mul([g for _, g in pairs], 1.0)):
                p.grad = copy
        else:  # later micro-batches of the step add up
            have = [(p, g) for p, g in pairs if p.grad is not None]
            torch._foreach_add_([p.grad for p, _ in have], [g for _, g in have])
            for p, g in pairs:
                if p.grad is None:
                    p.grad = g.clone()
        return loss.clone()
