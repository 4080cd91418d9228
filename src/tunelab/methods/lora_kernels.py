"""The dropout of fused LoRA (`lora_fused.py`) as two Triton kernels on CUDA; torch ops elsewhere.

A group of G projections reading one input x [T, in] needs G independent dropout masks of
x, and in backward the sum over g of mask_g * (grad_low_g @ A_g) / (1 - p). In torch ops
that is one dropout kernel that cannot vectorise over a broadcast input, then for backward
a batched matmul writing G [T, in] products, a dropout-backward pass over them and a sum:
about nine passes of [T, in] memory per member. Here:

- `dropout_copies`: one kernel reads x once and writes the G kept copies and G masks
  (Philox counters from a seed drawn by torch's generator on the device, so CUDA graphs
  replay it with fresh masks and a resumed run draws what an uninterrupted one would);
- `masked_low_rank_sum`: one kernel computes scale * sum_g mask_g * (grad_low_g @ A_g)
  straight into [T, in], the rank-r products in registers: the masks are read once and
  nothing of size [G, T, in] is written.

Both take the masks as bytes; `tests/test_lora_kernels.py` runs them on the CPU through
Triton's interpreter against the torch ops they replace.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

USE_TRITON = True
"""Off: torch ops everywhere (a benchmark lever)."""

_BLOCK = 2048  # elements of x per program of `dropout_copies` (4 Philox outputs per counter)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the tests' CPU runs


def usable(x: torch.Tensor) -> bool:
    """The Triton kernels run on `x` (CUDA, Triton installed, int32 offsets suffice)."""
    return USE_TRITON and triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _store_kept(x, uniform, offsets, inside, kept_ptr, mask_ptr, p, scale):
        keep = uniform >= p
        kept = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(kept_ptr + offsets, kept.to(kept_ptr.dtype.element_ty), mask=inside)
        tl.store(mask_ptr + offsets, keep.to(tl.uint8), mask=inside)

    @triton.jit
    def _dropout_copies(x_ptr, kept_ptr, mask_ptr, seed_ptr, numel, counters_per_copy, p, scale,
                        COPIES: tl.constexpr, BLOCK: tl.constexpr):
        """x read once; for each copy g, four uniforms per Philox counter decide four quarters
        of the block: kept_g = x * keep / (1 - p), mask_g = keep."""
        pid = tl.program_id(0)
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        o0 = pid * BLOCK + lanes
        o1 = o0 + QUARTER
        o2 = o1 + QUARTER
        o3 = o2 + QUARTER
        x0 = tl.load(x_ptr + o0, mask=o0 < numel, other=0.0)
        x1 = tl.load(x_ptr + o1, mask=o1 < numel, other=0.0)
        x2 = tl.load(x_ptr + o2, mask=o2 < numel, other=0.0)
        x3 = tl.load(x_ptr + o3, mask=o3 < numel, other=0.0)
        seed = tl.load(seed_ptr)
        for g in tl.static_range(COPIES):
            u0, u1, u2, u3 = tl.rand4x(seed, g * counters_per_copy + pid * QUARTER + lanes)
            _store_kept(x0, u0, g * numel + o0, o0 < numel, kept_ptr, mask_ptr, p, scale)
            _store_kept(x1, u1, g * numel + o1, o1 < numel, kept_ptr, mask_ptr, p, scale)
            _store_kept(x2, u2, g * numel + o2, o2 < numel, kept_ptr, mask_ptr, p, scale)
            _store_kept(x3, u3, g * numel + o3, o3 < numel, kept_ptr, mask_ptr, p, scale)

    @triton.jit
    def _masked_low_rank_sum(low_ptr, a_ptr, mask_ptr, out_ptr, rows, width, scale,
                             COPIES: tl.constexpr, RANK: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr,
                             EXACT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """out = scale * sum_g mask_g * (low_g @ a_g), one [BLOCK_ROWS, BLOCK_COLS] tile a
        program; the rank-r product on the tensor cores with r padded to K >= 16."""
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        k = tl.arange(0, K)
        row_in, col_in, k_in = r < rows, c < width, k < RANK
        both = row_in[:, None] & col_in[None, :]
        total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for g in tl.static_range(COPIES):
            low = tl.load(low_ptr + (g * rows + r[:, None]) * RANK + k[None, :],
                          mask=row_in[:, None] & k_in[None, :], other=0.0)
            a = tl.load(a_ptr + (g * RANK + k[:, None]) * width + c[None, :],
                        mask=k_in[:, None] & col_in[None, :], other=0.0)
            if EXACT:  # fp32 inputs (and under Triton's interpreter, whose bf16 dot is wrong)
                product = tl.dot(low.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                product = tl.dot(low, a)
            if HAS_MASK:
                keep = tl.load(mask_ptr + (g * rows + r[:, None]) * width + c[None, :], mask=both, other=0)
                product = tl.where(keep != 0, product, 0.0)
            total += product
        tl.store(out_ptr + r[:, None] * width + c[None, :], (total * scale).to(out_ptr.dtype.element_ty), mask=both)


def dropout_copies(rows: torch.Tensor, p: float, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` independent dropout draws of `rows` [T, in]: (kept values scaled by 1/(1-p),
    [copies, T, in]; boolean masks, same shape)."""
    if not usable(rows) or copies * rows.numel() >= 2**31:
        return torch.native_dropout(rows.expand(copies, *rows.shape), p, True)
    rows = rows.contiguous()
    kept = torch.empty((copies, *rows.shape), dtype=rows.dtype, device=rows.device)
    mask = torch.empty((copies, *rows.shape), dtype=torch.bool, device=rows.device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=rows.device)  # torch's generator: graph-safe
    programs = triton.cdiv(rows.numel(), _BLOCK)
    _dropout_copies[(programs,)](rows, kept, mask.view(torch.uint8), seed, rows.numel(), programs * _BLOCK // 4,
                                 float(p), 1.0 / (1.0 - p), COPIES=copies, BLOCK=_BLOCK, num_warps=8)
    return kept, mask


def masked_low_rank_sum(grad_low: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                        p: float) -> torch.Tensor:
    """sum_g mask_g * (grad_low_g @ a_g) / (1 - p): grad_low [G, T, r], a [G, r, in], mask
    [G, T, in] bool or None (no dropout) -> [T, in] in grad_low's dtype."""
    copies, rows, rank = grad_low.shape
    width = a.shape[-1]
    if not usable(grad_low) or copies * rows * width >= 2**31:
        back = torch.bmm(grad_low, a)
        if mask is not None:
            back = torch.ops.aten.native_dropout_backward(back, mask, 1.0 / (1.0 - p))
        return back.sum(0) if copies > 1 else back[0]
    out = torch.empty((rows, width), dtype=grad_low.dtype, device=grad_low.device)
    grid = (triton.cdiv(rows, 64), triton.cdiv(width, 128))
    _masked_low_rank_sum[grid](grad_low.contiguous(), a.contiguous(),
                               mask.view(torch.uint8) if mask is not None else grad_low, out, rows, width,
                               1.0 / (1.0 - p) if mask is not None else 1.0, COPIES=copies, RANK=rank,
                               K=max(16, triton.next_power_of_2(rank)), HAS_MASK=mask is not None,
                               EXACT=grad_low.dtype == torch.float32 or _INTERPRETED, BLOCK_ROWS=64,
                               BLOCK_COLS=128, num_warps=4)
    return out
