"""The dropout of fused LoRA (`lora_fused.py`) as two Triton kernels on CUDA; torch ops elsewhere.

A group of G projections reading one input x [T, in] needs G independent dropout masks of
x, and in backward the sum over g of mask_g * (grad_low_g @ A_g) / (1 - p). In torch ops
that is one dropout kernel that cannot vectorise over a broadcast input, then for backward
a batched matmul writing G [T, in] products, a dropout-backward pass over them and a sum:
about nine passes of [T, in] memory per member. Here:

- `dropout_copies`: one kernel reads x once and writes the G kept copies and G masks
  (Philox counters from a seed drawn by torch's generator on the device, so CUDA graphs
  replay it with fresh masks and a resumed run draws what an uninterrupted one would;
  16 random bits an element, so one Philox call decides eight elements; Philox-4x32 with
  7 rounds, the fewest its authors found to pass the BigCrush tests (curand uses 10));
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

_BLOCK = 8192  # elements of x per program of `dropout_copies` (8 per Philox counter)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the tests' CPU runs


def usable(x: torch.Tensor) -> bool:
    """The Triton kernels run on `x` (CUDA, Triton installed, int32 offsets suffice)."""
    return USE_TRITON and triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _store_kept(x, bits, offsets, inside, kept_ptr, mask_ptr, threshold, scale):
        keep = bits.to(tl.int32) >= threshold  # bits: 16 random bits, uniform in [0, 65536)
        kept = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(kept_ptr + offsets, kept.to(kept_ptr.dtype.element_ty), mask=inside)
        tl.store(mask_ptr + offsets, keep.to(tl.uint8), mask=inside)

    @triton.jit
    def _store_pair(x_ptr, kept_ptr, mask_ptr, word, first, second, numel, copy_offset, threshold, scale):
        """Two elements from one 32-bit Philox word: its low and its high 16 bits."""
        low_bits, high_bits = word & 0xFFFF, (word >> 16) & 0xFFFF
        x = tl.load(x_ptr + first, mask=first < numel, other=0.0)
        _store_kept(x, low_bits, copy_offset + first, first < numel, kept_ptr, mask_ptr, threshold, scale)
        x = tl.load(x_ptr + second, mask=second < numel, other=0.0)
        _store_kept(x, high_bits, copy_offset + second, second < numel, kept_ptr, mask_ptr, threshold, scale)

    @triton.jit
    def _dropout_copies(x_ptr, kept_ptr, mask_ptr, seed_ptr, numel, counters_per_copy, threshold, scale,
                        COPIES: tl.constexpr, BLOCK: tl.constexpr):
        """For each copy g: kept_g = x * keep / (1 - p), mask_g = keep. One Philox counter
        gives four 32-bit words, i.e. eight 16-bit uniforms, for eight eighths of the block
        (Philox's arithmetic, not memory, is what bounds a dropout kernel on these cards)."""
        pid = tl.program_id(0)
        EIGHTH: tl.constexpr = BLOCK // 8
        lanes = tl.arange(0, EIGHTH)
        o = pid * BLOCK + lanes
        seed = tl.load(seed_ptr)
        for g in tl.static_range(COPIES):
            w0, w1, w2, w3 = tl.randint4x(seed, g * counters_per_copy + pid * EIGHTH + lanes, n_rounds=7)
            at = g * numel
            _store_pair(x_ptr, kept_ptr, mask_ptr, w0, o, o + EIGHTH, numel, at, threshold, scale)
            _store_pair(x_ptr, kept_ptr, mask_ptr, w1, o + 2 * EIGHTH, o + 3 * EIGHTH, numel, at, threshold, scale)
            _store_pair(x_ptr, kept_ptr, mask_ptr, w2, o + 4 * EIGHTH, o + 5 * EIGHTH, numel, at, threshold, scale)
            _store_pair(x_ptr, kept_ptr, mask_ptr, w3, o + 6 * EIGHTH, o + 7 * EIGHTH, numel, at, threshold, scale)

    @triton.jit
    def _masked_low_rank_sum(low_ptr, a_ptr, mask_ptr, add_ptr, add_stride, out_ptr, rows, width, scale,
                             COPIES: tl.constexpr, RANK: tl.constexpr, K: tl.constexpr, HAS_MASK: tl.constexpr,
                             HAS_ADD: tl.constexpr, EXACT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                             BLOCK_COLS: tl.constexpr):
        """out = scale * sum_g mask_g * (low_g @ a_g) (+ add), one [BLOCK_ROWS, BLOCK_COLS]
        tile a program; the rank-r product on the tensor cores with r padded to K >= 16."""
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
        total = total * scale
        if HAS_ADD:
            total += tl.load(add_ptr + r[:, None] * add_stride + c[None, :], mask=both, other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * width + c[None, :], total.to(out_ptr.dtype.element_ty), mask=both)


def _threshold(p: float) -> int:
    """The kernel drops an element when its 16 random bits fall below this."""
    return round(p * 65536)


def _kept_scale(p: float) -> float:
    """What the kernel scales kept values by: 1 / (1 - p) for p as drawn."""
    return 65536 / (65536 - _threshold(p))


def dropout_copies(rows: torch.Tensor, p: float, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` independent dropout draws of `rows` [T, in]: (kept values scaled by 1/(1-p),
    [copies, T, in]; boolean masks, same shape). The Triton kernel drops with probability p
    rounded to a multiple of 1/65536 (0.1 -> 0.1000061) and scales by the inverse of what
    it keeps, so the expectation is exact."""
    if not usable(rows) or copies * rows.numel() >= 2**31:
        return torch.native_dropout(rows.expand(copies, *rows.shape), p, True)
    rows = rows.contiguous()
    kept = torch.empty((copies, *rows.shape), dtype=rows.dtype, device=rows.device)
    mask = torch.empty((copies, *rows.shape), dtype=torch.bool, device=rows.device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=rows.device)  # torch's generator: graph-safe
    programs = triton.cdiv(rows.numel(), _BLOCK)
    _dropout_copies[(programs,)](rows, kept, mask.view(torch.uint8), seed, rows.numel(), programs * _BLOCK // 8,
                                 _threshold(p), _kept_scale(p), COPIES=copies, BLOCK=_BLOCK, num_warps=8)
    return kept, mask


def masked_low_rank_sum(grad_low: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                        p: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """sum_g mask_g * (grad_low_g @ a_g) / (1 - p) (+ add): grad_low [G, T, r], a [G, r, in],
    mask [G, T, in] bool or None (no dropout), add [T, in] with unit column stride or None
    -> a new [T, in] in grad_low's dtype. The masks are those `dropout_copies` returned, so
    1/(1-p) is applied as the kept values were scaled (the rounded p on CUDA)."""
    copies, rows, rank = grad_low.shape
    width = a.shape[-1]
    if not usable(grad_low) or copies * rows * width >= 2**31:
        back = torch.bmm(grad_low, a)
        if mask is not None:
            back = torch.ops.aten.native_dropout_backward(back, mask, 1.0 / (1.0 - p))
        back = back.sum(0) if copies > 1 else back[0]
        return back if add is None else back.add_(add)
    out = torch.empty((rows, width), dtype=grad_low.dtype, device=grad_low.device)
    grid = (triton.cdiv(rows, 64), triton.cdiv(width, 128))
    if add is not None:
        assert add.shape == (rows, width) and add.stride(1) == 1, "add must be [T, in] with unit column stride"
    _masked_low_rank_sum[grid](grad_low.contiguous(), a.contiguous(),
                               mask.view(torch.uint8) if mask is not None else grad_low,
                               add if add is not None else out, add.stride(0) if add is not None else 0,
                               out, rows, width,
                               _kept_scale(p) if mask is not None else 1.0, COPIES=copies, RANK=rank,
                               K=max(16, triton.next_power_of_2(rank)), HAS_MASK=mask is not None,
                               HAS_ADD=add is not None,
                               EXACT=grad_low.dtype == torch.float32 or _INTERPRETED, BLOCK_ROWS=64,
                               BLOCK_COLS=128, num_warps=4)
    return out
