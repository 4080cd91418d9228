"""RMSNorm with a frozen weight as two Triton kernels, one program a row.

liger-kernel's RMSNorm (`accel/liger.py`) runs its backward, for fewer than 32,768 rows, as one
program per SM that walks its rows one at a time and sums the weight's gradient: on a packed
step of a few thousand tokens that takes several times what reading dY and x and writing dx
takes, twice a layer. Every PEFT method here freezes the norms, so no weight gradient is
needed, and a grid of one program a row keeps the card's memory busy (the timings:
docs/PERFORMANCE.md, "Figures the code refers to").

    y = (x * rstd).to(dtype) * (w + offset),   rstd = 1 / sqrt(mean(x^2) + eps)
    dx = rstd * m - rstd^3 / n * sum(m * x) * x,   m = dy * (w + offset)   (fp32 inside)

which is liger's "llama" casting (Llama, Qwen2, Mistral and most others: only rstd in fp32,
as transformers' own RMSNorm rounds). `fast_norms(model)` routes liger's llama-cast norms
with a frozen weight through `rms_norm` for the block and puts them back after; a norm
whose weight trains keeps liger's kernels. `tests/test_rms_norm.py` runs both kernels on
the CPU through Triton's interpreter against the torch formula.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_ROWS, _WARPS = 1, 4  # rows a program, warps (`bench/kernels_bench.py --norm` on an H200: 1-8 rows, 2-8 warps tried)

if triton is not None:
    @triton.jit
    def _tile(w_ptr, rows, cols, offset, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """This program's rows, whether each element is inside, its offset, and w + offset."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        inside = (r < rows)[:, None] & (c < cols)[None, :]
        at = r[:, None].to(tl.int64) * cols + c[None, :]
        w = tl.load(w_ptr + c, mask=c < cols, other=0.0).to(tl.float32) + offset
        return r, inside, at, w

    @triton.jit
    def _forward(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, eps, offset, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
        r, inside, at, w = _tile(w_ptr, rows, cols, offset, ROWS, BLOCK)
        x = tl.load(x_ptr + at, mask=inside, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / cols + eps)
        tl.store(rstd_ptr + r, rstd, mask=r < rows)
        normed = (xf * rstd[:, None]).to(x.dtype)
        tl.store(y_ptr + at, (normed.to(tl.float32) * w[None, :]).to(x.dtype), mask=inside)

    @triton.jit
    def _backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, rows, cols, offset, ROWS: tl.constexpr,
                  BLOCK: tl.constexpr):
        r, inside, at, w = _tile(w_ptr, rows, cols, offset, ROWS, BLOCK)
        dy = tl.load(dy_ptr + at, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        m = dy * w[None, :]
        dot = tl.sum(m * x, axis=1)
        dx = rstd[:, None] * m - (rstd * rstd * rstd * dot / cols)[:, None] * x
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        n, cols = rows.shape
        y = torch.empty_like(rows)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        _forward[(triton.cdiv(n, _ROWS),)](rows, weight, y, rstd, n, cols, eps, offset, ROWS=_ROWS, BLOCK=block,
                                           num_warps=_WARPS)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset, ctx.shape = offset, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        n, cols = rows.shape
        dy = dy.reshape(n, cols).contiguous()
        dx = torch.empty_like(rows)
        block = triton.next_power_of_2(cols)
        _backward[(triton.cdiv(n, _ROWS),)](dy, rows, weight, rstd, dx, n, cols, ctx.offset, ROWS=_ROWS,
                                            BLOCK=block, num_warps=_WARPS)
        return dx.view(ctx.shape), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x's last dimension with a weight that gets no gradient (Triton kernels)."""
    if weight.requires_grad:
        raise ValueError("rms_norm computes no weight gradient: the weight must be frozen")
    return _RMSNorm.apply(x, weight, float(eps), float(offset))


def _fast_forward(self, hidden_states):
    if self.weight is None or self.weight.requires_grad or not hidden_states.is_cuda:
        return self._liger_forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.offset)


def eligible(module: torch.nn.Module) -> bool:
    """A liger RMSNorm in llama casting (its weight's trainability is checked every call)."""
    return (module._get_name().startswith("LigerRMSNorm")  # liger's class, or a norm liger patched and renamed
            and getattr(module, "casting_mode", None) == "llama"
            and getattr(module, "weight", None) is not None and hasattr(module, "variance_epsilon"))


@contextmanager
def fast_norms(model: torch.nn.Module, enabled: bool = True):
    """Within the block, `model`'s liger llama-cast RMSNorms with a frozen weight run
    `rms_norm`; yields how many norms were routed. `enabled` False (`Levers.triton_rms_norm`):
    liger's own RMSNorm kernels stay."""
    norms = [m for m in model.modules() if eligible(m)] if enabled and triton is not None else []
    for norm in norms:
        norm._liger_forward = norm.forward
        norm.forward = types.MethodType(_fast_forward, norm)
    try:
        yield len(norms)
    finally:
        for norm in norms:
            norm.forward = norm._liger_forward
            del norm._liger_forward
