"""The dropout of fused LoRA (`accel/lora.py`) as Triton kernels on CUDA; torch ops elsewhere.

A group of G projections reading one input x [T, in] needs, with LoRA's dropout p and G
independent masks m_g,

    low_g = (m_g * x) A_g^T / (1 - p)                         (forward, [T, r] each)
    grad_x = sum_g m_g * (grad_low_g A_g) / (1 - p)           (backward, [T, in])
    grad_A_g = grad_low_g^T (m_g * x) / (1 - p)               (backward, [r, in])

In torch ops that is one dropout kernel that cannot vectorise over a broadcast input, a
batched matmul, and for backward another batched matmul writing G [T, in] products, a
dropout-backward pass over them and a sum: about nine passes of [T, in] memory a member.
The default path (measured, docs/PERFORMANCE.md):

- `dropout_copies`: one kernel reads x once and writes the G kept copies and G masks
  (Philox counters from a seed drawn by torch's generator on the device, so CUDA graphs
  replay it with fresh masks and a resumed run draws what an uninterrupted one would;
  16 random bits an element, so one Philox call decides eight elements; Philox-4x32 with
  7 rounds, the fewest its authors found to pass the BigCrush tests (curand uses 10));
  the low-rank products and A's gradients are batched matmuls over the copies;
- `masked_low_rank_sum`: one kernel computes scale * sum_g mask_g * (grad_low_g @ A_g)
  straight into [T, in], the rank-r products in registers: the masks are read once and
  nothing of size [G, T, in] is written.

The kept copies and byte masks (3 G bytes an element of x, held for the backward) are most
of a LoRA step's activation memory. `bits=True` switches to a pair that keeps neither:

- `_dropout_low`: reads x, draws the same kind of masks, multiplies the kept x by A_g on
  the tensor cores and keeps the masks as bits (G/8 bytes an element of x);
- `_dropout_low_backward`: reads x, the bits and grad_low, writes grad_x (the base part
  added if given) and A's gradients in fp32 as one partial sum per block of rows (a
  deterministic sum, no atomics).

The Triton kernels drop with probability p rounded to a multiple of 1/65536 (0.1 ->
0.1000061) and scale by the inverse of what they keep, so the expectation is exact.
`dropout_low` / `dropout_low_backward` choose the path; `tests/test_lora_kernels.py` runs
every kernel on the CPU through Triton's interpreter against the torch ops it replaces;
`bench/kernels_bench.py` times them on a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Two choices reach every function below as arguments (from `accel.Levers`, through the fused
# LoRA groups): `triton_kernels` (False: torch ops everywhere, `Levers.triton_lora_dropout`) and, for
# `dropout_low`, `bits` (True: the fused pair `_dropout_low` / `_dropout_low_backward`, no
# kept copies, masks as bits, less memory and a little slower, docs/PERFORMANCE.md; False:
# `_dropout_copies` and `_masked_low_rank_sum` with batched matmuls; `--train.lora_dropout_kernel`).

# launch settings (`bench/kernels_bench.py --sweep` times the alternatives):
_BLOCK, _COPIES_WARPS = 8192, 8  # elements of x per program of `dropout_copies` (8 per Philox counter)
_SUM_ROWS, _SUM_COLS, _SUM_WARPS = 32, 128, 4  # the tile of `masked_low_rank_sum` (swept on an H200)
SUB = 32  # columns of x decided by one 16-bit lane of a Philox counter's output; 8 SUB = one chunk
CHUNK = 8 * SUB  # columns of x a counter row covers: its 8 x 16 bits, one byte of mask bits a column lane
# the fused pair's programs: 64 rows x two chunks forward, 64 rows x one chunk backward, 8 warps
# each (the fastest of `kernels_bench.py --sweep` on an H200; 4 warps spill in backward)
_FORWARD_ROWS, _FORWARD_CHUNKS, _FORWARD_WARPS = 64, 2, 8
_BACKWARD_ROWS, _BACKWARD_WARPS = 64, 8
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the tests' CPU runs


def usable(x: torch.Tensor) -> bool:
    """The Triton kernels run on `x` (CUDA, Triton installed)."""
    return triton is not None and x.is_cuda


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

    @triton.jit
    def _dropout_low(x_ptr, a_ptr, bits_ptr, out_ptr, seed_ptr, rows, width, n_bytes, chunks, threshold, scale,
                     COPIES: tl.constexpr, RANK: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr,
                     EXACT: tl.constexpr, BLOCK_ROWS: tl.constexpr, SUB: tl.constexpr):
        """For each copy g and rows r of this program: mask bits of chunks [SPLIT s, SPLIT (s+1)),
        and the partial product (m_g * x[r]) A_g^T * scale over those chunks' columns into
        out[s, g, r]. Column j SUB + lane of a chunk is decided by the j-th 16 bits of the
        Philox counter (g, row, chunk, lane) and stored as bit j of mask byte (chunk, lane)."""
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        split = tl.program_id(1)
        lane = tl.arange(0, SUB)
        k = tl.arange(0, K)
        row_in, k_in = r < rows, k < RANK
        seed = tl.load(seed_ptr)
        for g in tl.static_range(COPIES):
            acc = tl.zeros((BLOCK_ROWS, K), dtype=tl.float32)
            for step in range(SPLIT):
                c = split * SPLIT + step
                byte = c * SUB + lane
                counter = (g * rows + r[:, None]) * n_bytes + byte[None, :]
                w0, w1, w2, w3 = tl.randint4x(seed, counter, n_rounds=7)
                packed = tl.zeros((BLOCK_ROWS, SUB), dtype=tl.int32)
                for j in tl.static_range(8):
                    if j // 2 == 0:
                        word = w0
                    elif j // 2 == 1:
                        word = w1
                    elif j // 2 == 2:
                        word = w2
                    else:
                        word = w3
                    half = (word >> (16 * (j % 2))) & 0xFFFF
                    keep = half.to(tl.int32) >= threshold
                    cols = c * 8 * SUB + j * SUB + lane
                    col_in = cols < width
                    x = tl.load(x_ptr + r[:, None] * width + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                                other=0.0)
                    x = tl.where(keep, x, 0.0)
                    a_t = tl.load(a_ptr + (g * RANK + k[None, :]) * width + cols[:, None],
                                  mask=col_in[:, None] & k_in[None, :], other=0.0)  # [SUB, K]
                    if EXACT:  # fp32 inputs (and under Triton's interpreter, whose bf16 dot is wrong)
                        acc += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(x, a_t)
                    packed = packed | (keep.to(tl.int32) << j)
                tl.store(bits_ptr + (g * rows + r[:, None]) * n_bytes + byte[None, :], packed.to(tl.uint8),
                         mask=row_in[:, None] & (byte < n_bytes)[None, :])
            tl.store(out_ptr + ((split * COPIES + g) * rows + r[:, None]) * RANK + k[None, :],
                     (acc * scale).to(out_ptr.dtype.element_ty), mask=row_in[:, None] & k_in[None, :])

    @triton.jit
    def _dropout_low_backward(low_ptr, a_ptr, bits_ptr, x_ptr, add_ptr, add_stride, out_ptr, part_ptr, coef_ptr,
                              rows, width, n_bytes, scale, coef,
                              COPIES: tl.constexpr, RANK: tl.constexpr, K: tl.constexpr, NEED_X: tl.constexpr,
                              HAS_ADD: tl.constexpr, PER_COPY: tl.constexpr, EXACT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                              SUB: tl.constexpr):
        """One chunk of columns of BLOCK_ROWS rows: out = scale * sum_g m_g * (low_g A_g) (+ add),
        and part[block, g] = coef_g * low_g^T (m_g * x) for these columns."""
        block = tl.program_id(0)
        r = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.program_id(1)
        lane = tl.arange(0, SUB)
        k = tl.arange(0, K)
        row_in, k_in = r < rows, k < RANK
        byte = c * SUB + lane
        for j in range(8):  # a loop, not unrolled: fewer registers
            cols = c * 8 * SUB + j * SUB + lane
            col_in = cols < width
            both = row_in[:, None] & col_in[None, :]
            x = tl.load(x_ptr + r[:, None] * width + cols[None, :], mask=both, other=0.0)
            total = tl.zeros((BLOCK_ROWS, SUB), dtype=tl.float32)
            for g in tl.static_range(COPIES):
                packed = tl.load(bits_ptr + (g * rows + r[:, None]) * n_bytes + byte[None, :],
                                 mask=row_in[:, None], other=0).to(tl.int32)
                keep = ((packed >> j) & 1) != 0
                low = tl.load(low_ptr + (g * rows + r[:, None]) * RANK + k[None, :],
                              mask=row_in[:, None] & k_in[None, :], other=0.0)  # [BLOCK_ROWS, K]
                a = tl.load(a_ptr + (g * RANK + k[:, None]) * width + cols[None, :],
                            mask=k_in[:, None] & col_in[None, :], other=0.0)  # [K, SUB]
                kept = tl.where(keep, x, 0.0)
                if EXACT:
                    grad_a = tl.dot(tl.trans(low.to(tl.float32)), kept.to(tl.float32), input_precision="ieee")
                else:
                    grad_a = tl.dot(tl.trans(low), kept.to(low.dtype))
                if NEED_X:
                    if EXACT:
                        product = tl.dot(low.to(tl.float32), a.to(tl.float32), input_precision="ieee")
                    else:
                        product = tl.dot(low, a)
                    total += tl.where(keep, product, 0.0)
                if PER_COPY:
                    grad_a = grad_a * tl.load(coef_ptr + g)
                else:
                    grad_a = grad_a * coef
                tl.store(part_ptr + ((block * COPIES + g) * RANK + k[:, None]) * width + cols[None, :], grad_a,
                         mask=k_in[:, None] & col_in[None, :])
            if NEED_X:
                total = total * scale
                if HAS_ADD:
                    total += tl.load(add_ptr + r[:, None] * add_stride + cols[None, :], mask=both,
                                     other=0.0).to(tl.float32)
                tl.store(out_ptr + r[:, None] * width + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=both)


def _threshold(p: float) -> int:
    """The kernels drop an element when its 16 random bits fall below this."""
    return round(p * 65536)


def _kept_scale(p: float) -> float:
    """What the kernels scale kept values by: 1 / (1 - p) for p as drawn."""
    return 65536 / (65536 - _threshold(p))


def dropout_copies(rows: torch.Tensor, p: float, copies: int,
                   triton_kernels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` independent dropout draws of `rows` [T, in]: (kept values scaled by 1/(1-p),
    [copies, T, in]; boolean masks, same shape). The Triton kernel drops with probability p
    rounded to a multiple of 1/65536 (0.1 -> 0.1000061) and scales by the inverse of what
    it keeps, so the expectation is exact."""
    if not (triton_kernels and usable(rows)) or copies * rows.numel() >= 2**31:
        return torch.native_dropout(rows.expand(copies, *rows.shape), p, True)
    rows = rows.contiguous()
    kept = torch.empty((copies, *rows.shape), dtype=rows.dtype, device=rows.device)
    mask = torch.empty((copies, *rows.shape), dtype=torch.bool, device=rows.device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=rows.device)  # torch's generator: graph-safe
    programs = triton.cdiv(rows.numel(), _BLOCK)
    _dropout_copies[(programs,)](rows, kept, mask.view(torch.uint8), seed, rows.numel(), programs * _BLOCK // 8,
                                 _threshold(p), _kept_scale(p), COPIES=copies, BLOCK=_BLOCK, num_warps=_COPIES_WARPS)
    return kept, mask


def masked_low_rank_sum(grad_low: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None,
                        p: float, add: torch.Tensor | None = None, triton_kernels: bool = True) -> torch.Tensor:
    """sum_g mask_g * (grad_low_g @ a_g) / (1 - p) (+ add): grad_low [G, T, r], a [G, r, in],
    mask [G, T, in] bool or None (no dropout), add [T, in] with unit column stride or None
    -> a new [T, in] in grad_low's dtype. The masks are those `dropout_copies` returned, so
    1/(1-p) is applied as the kept values were scaled (the rounded p on CUDA)."""
    copies, rows, rank = grad_low.shape
    width = a.shape[-1]
    if not (triton_kernels and usable(grad_low)) or copies * rows * width >= 2**31:
        back = torch.bmm(grad_low, a)
        if mask is not None:
            back = torch.ops.aten.native_dropout_backward(back, mask, 1.0 / (1.0 - p))
        back = back.sum(0) if copies > 1 else back[0]
        return back if add is None else back.add_(add)
    out = torch.empty((rows, width), dtype=grad_low.dtype, device=grad_low.device)
    grid = (triton.cdiv(rows, _SUM_ROWS), triton.cdiv(width, _SUM_COLS))
    if add is not None:
        assert add.shape == (rows, width) and add.stride(1) == 1, "add must be [T, in] with unit column stride"
    _masked_low_rank_sum[grid](grad_low.contiguous(), a.contiguous(),
                               mask.view(torch.uint8) if mask is not None else grad_low,
                               add if add is not None else out, add.stride(0) if add is not None else 0,
                               out, rows, width,
                               _kept_scale(p) if mask is not None else 1.0, COPIES=copies, RANK=rank,
                               K=max(16, triton.next_power_of_2(rank)), HAS_MASK=mask is not None,
                               HAS_ADD=add is not None,
                               EXACT=grad_low.dtype == torch.float32 or _INTERPRETED, BLOCK_ROWS=_SUM_ROWS,
                               BLOCK_COLS=_SUM_COLS, num_warps=_SUM_WARPS)
    return out


def unpack(bits: torch.Tensor, width: int) -> torch.Tensor:
    """The boolean masks [G, T, width] that the fused kernel's bits [G, T, bytes] stand for:
    column c * CHUNK + j * SUB + lane is bit j of byte c * SUB + lane."""
    copies, rows, n_bytes = bits.shape
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    flags = (bits.view(copies, rows, n_bytes // SUB, 1, SUB) >> shifts[:, None]) & 1  # [G, T, chunk, j, lane]
    return flags.reshape(copies, rows, -1)[..., :width].bool()


def dropout_low(rows: torch.Tensor, a: torch.Tensor, p: float, bits: bool = False,
                triton_kernels: bool = True) -> tuple[torch.Tensor, tuple]:
    """low [G, T, r] = dropout_g(rows) @ a_g^T for rows [T, in] and a [G, r, in], and what
    `dropout_low_backward` needs of the draw: () when p is 0; (bits,) from the fused kernel
    (`bits` on CUDA); else (kept copies [G, T, in], boolean masks [G, T, in])."""
    copies, rank, width = a.shape
    if p == 0:
        return (rows @ a.reshape(copies * rank, width).t()).view(-1, copies, rank).transpose(0, 1), ()
    if not (bits and triton_kernels and usable(rows)):
        dropped, mask = dropout_copies(rows, p, copies, triton_kernels)
        return torch.bmm(dropped, a.transpose(1, 2)), (dropped, mask)
    rows, a = rows.contiguous(), a.contiguous()
    tokens = rows.shape[0]
    chunks = triton.cdiv(width, CHUNK)
    n_bytes = chunks * SUB
    assert copies * tokens * n_bytes < 2**31, "too many elements for the kernel's int32 counters"
    splits = triton.cdiv(chunks, _FORWARD_CHUNKS)
    bits = torch.empty((copies, tokens, n_bytes), dtype=torch.uint8, device=rows.device)
    out = torch.empty((splits, copies, tokens, rank), dtype=rows.dtype if splits == 1 else torch.float32,
                      device=rows.device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=rows.device)  # torch's generator: graph-safe
    grid = (triton.cdiv(tokens, _FORWARD_ROWS), splits)
    _dropout_low[grid](rows, a, bits, out, seed, tokens, width, n_bytes, chunks, _threshold(p), _kept_scale(p),
                       COPIES=copies, RANK=rank, K=max(16, triton.next_power_of_2(rank)), SPLIT=_FORWARD_CHUNKS,
                       EXACT=rows.dtype == torch.float32 or _INTERPRETED, BLOCK_ROWS=_FORWARD_ROWS, SUB=SUB,
                       num_warps=_FORWARD_WARPS)
    low = out[0] if splits == 1 else out.sum(0).to(rows.dtype)
    return low, (bits,)


def dropout_low_backward(grad_low: torch.Tensor, a: torch.Tensor, drawn: tuple, rows: torch.Tensor, p: float,
                         scale: float | torch.Tensor, add: torch.Tensor | None = None, need_x: bool = True,
                         triton_kernels: bool = True):
    """(grad_x, grad_a) of `dropout_low` for grad_low [G, T, r] and its `drawn`: grad_x
    [T, in] in grad_low's dtype (+ add, a [T, in] with unit column stride; None unless
    need_x), and grad_a = scale * grad_low^T dropout(rows) [G, r, in] in fp32 (scale: a
    float or [G, 1, 1])."""
    copies, rank, width = a.shape
    tokens = grad_low.shape[1]
    if not drawn:  # no dropout: two plain matmuls
        flat_low = grad_low.transpose(0, 1).reshape(tokens, copies * rank)  # [T, G r]
        grad_a = fp32_product(torch.mm, flat_low.t(), rows).view(copies, rank, width).mul_(scale)
        grad_x = None
        if need_x:
            weight = a.reshape(copies * rank, width)
            grad_x = flat_low @ weight if add is None else torch.addmm(add, flat_low, weight)
        return grad_x, grad_a
    if len(drawn) == 2:  # kept copies and masks
        dropped, mask = drawn
        grad_a = fp32_product(torch.bmm, grad_low.transpose(1, 2), dropped).mul_(scale)
        grad_x = masked_low_rank_sum(grad_low, a, mask, p, add=add, triton_kernels=triton_kernels) if need_x else None
        return grad_x, grad_a
    (bits,) = drawn
    n_bytes = bits.shape[-1]
    if add is not None and need_x:
        assert add.shape == (tokens, width) and add.stride(1) == 1, "add must be [T, in] with unit column stride"
    blocks = triton.cdiv(tokens, _BACKWARD_ROWS)
    out = torch.empty((tokens, width) if need_x else (1,), dtype=grad_low.dtype, device=grad_low.device)
    part = torch.empty((blocks, copies, rank, width), dtype=torch.float32, device=grad_low.device)
    kept = _kept_scale(p)
    per_copy = isinstance(scale, torch.Tensor)
    coef = (scale.reshape(-1).float() * kept).contiguous() if per_copy else part
    _dropout_low_backward[(blocks, n_bytes // SUB)](
        grad_low.contiguous(), a.contiguous(), bits, rows.contiguous(), add if add is not None else out,
        add.stride(0) if add is not None else 0, out, part, coef, tokens, width, n_bytes, kept,
        0.0 if per_copy else float(scale) * kept,
        COPIES=copies, RANK=rank, K=max(16, triton.next_power_of_2(rank)), NEED_X=need_x,
        HAS_ADD=add is not None and need_x, PER_COPY=per_copy, EXACT=grad_low.dtype == torch.float32 or _INTERPRETED,
        BLOCK_ROWS=_BACKWARD_ROWS, SUB=SUB, num_warps=_BACKWARD_WARPS)
    return (out if need_x else None), part.sum(0)


def _mm_dtype_overload(op) -> bool:
    return "dtype" in op.overloads()


_OUT_DTYPE = _mm_dtype_overload(torch.ops.aten.mm) and _mm_dtype_overload(torch.ops.aten.bmm)


def fp32_product(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (op: torch.mm or torch.bmm) in fp32: written in fp32 by the matmul itself for
    half-precision CUDA inputs where torch can, else computed and then cast."""
    if _OUT_DTYPE and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return op(a, b, out_dtype=torch.float32)
    return op(a, b).float()
