"""The training loss: cross-entropy over a large vocabulary, never holding all the logits.

`linear_cross_entropy(hidden, weight, targets)` is sum_i CE(hidden_i @ weight.T, target_i),
computed a chunk of rows at a time. Each chunk's gradient is computed in the forward, while
its logits exist, so only one chunk of logits is ever alive (Qwen2's vocabulary has 151,936
ids: the fp32 logits of a whole step would dwarf the rest of a LoRA step).

Per chunk, turning logits into (loss, d loss / d logits) is one pass of reading and one of
writing. On CUDA it is one Triton kernel (`_cross_entropy_rows`: an online log-sum-exp
over the row, then the softmax minus the one-hot target written over the logits, all in
fp32 registers); elsewhere, and where Triton is missing, the same arithmetic in torch ops
(an fp32 copy of the chunk, about ten kernels). Both compute the softmax in fp32 from the
same rounded logits; `tests/test_cross_entropy.py` holds them to each other (the Triton
kernel runs on the CPU there, through Triton's interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_ELEMENTS = 2**28
"""Logits held at once (1 GiB in fp32): rows per chunk = this / vocab."""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None


if triton is not None:
    @triton.jit
    def _cross_entropy_rows(logits_ptr, stride, targets_ptr, weights_ptr, losses_ptr, vocab,
                            HAS_WEIGHTS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One program a row: losses[row] = w * (logsumexp(x) - x[target]); with WRITE_GRAD,
        x is overwritten by w * (softmax(x) - onehot(target))."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + row).to(tl.float32)
        else:
            weight = 1.0
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        picked = tl.load(base + target).to(tl.float32)  # read before the gradient overwrites it
        tl.store(losses_ptr + row, (lse - picked) * weight)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < vocab, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse)
                grad = tl.where(cols == target, grad - 1.0, grad) * weight
                tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < vocab)


def triton_usable(logits: torch.Tensor, wanted: bool = True) -> bool:
    """The Triton kernel runs on these logits (`wanted`, CUDA, Triton installed); `wanted`
    False (`Levers.triton_cross_entropy`) takes the torch path everywhere."""
    return wanted and triton is not None and logits.is_cuda


def rows_loss_triton(logits: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor | None,
                     write_grad: bool, block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """Per-row (weighted) losses of [rows, vocab] logits, fp32; with `write_grad` the logits
    are replaced, in place, by the gradient of the summed loss."""
    assert logits.stride(-1) == 1, "logits rows must be contiguous"
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        weights = row_weights if row_weights is not None else targets  # unused without HAS_WEIGHTS
        _cross_entropy_rows[(logits.shape[0],)](
            logits, logits.stride(0), targets, weights, losses, logits.shape[1],
            HAS_WEIGHTS=row_weights is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps)
    return losses


def rows_loss_torch(logits: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor | None,
                    write_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rows_loss_triton` in torch ops: (per-row fp32 losses, fp32 gradient or None). fp32
    logits are overwritten by the gradient (no copy), as the Triton kernel does."""
    exact = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(exact, dim=-1)
    losses = lse - exact.gather(1, targets[:, None]).squeeze(1)
    weights = None if row_weights is None else row_weights.to(exact.dtype)
    if weights is not None:
        losses = losses * weights
    if not write_grad:
        return losses, None
    grad = exact.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 copy
    grad[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    if weights is not None:
        grad.mul_(weights[:, None])
    return losses, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), a chunk of rows at a time.

    The backward of each chunk is computed in the forward, while its logits exist, so only
    one chunk of logits is ever alive; backward scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, row_weights=None, use_triton=True):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        exact = torch.promote_types(hidden.dtype, torch.float32)  # half precision: fp32 softmax
        grad_weight = torch.zeros_like(weight, dtype=exact) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=exact) if need_bias else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            w = None if row_weights is None else row_weights[start:start + chunk]
            logits = F.linear(h, weight, bias)
            if triton_usable(logits, use_triton):
                total += rows_loss_triton(logits, t, w, need_grad).sum()
                grad = logits  # now holds the gradient, in the logits' dtype
            else:
                losses, grad = rows_loss_torch(logits, t, w, need_grad)
                total += losses.sum()
            if not need_grad:
                continue
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=exact)
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(exact)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                         use_triton: bool = True) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, never holding
    more than `LOGIT_ELEMENTS` logits. hidden [N, H], weight [V, H], targets [N] (no -100);
    `row_weights` [N] scales each row's loss (0 drops a row of fixed-size inputs);
    `use_triton` False: the torch path even on CUDA."""
    chunk = max(1, LOGIT_ELEMENTS // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.to(weight.dtype), weight, bias, targets, chunk, row_weights,
                                        use_triton)
