"""The training loss: chunked linear cross-entropy equals plain cross-entropy (value and
gradients, float64), row weights drop rows, and the Triton kernel that computes a chunk's
loss and gradient on CUDA agrees with the torch path. Triton's interpreter runs that kernel
on the CPU, in a subprocess because the interpreter is chosen when kernels are defined."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_interpreted
from tunelab.accel.kernels import cross_entropy
from tunelab.accel.kernels.cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_plain_cross_entropy(monkeypatch, with_bias):
    monkeypatch.setattr(cross_entropy, "LOGIT_ELEMENTS", 3 * 50)  # chunks of 3 rows
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (10,), generator=g)
    mine = linear_cross_entropy(hidden, weight, targets, bias) * 0.5
    mine_grads = torch.autograd.grad(mine, [t for t in (hidden, weight, bias) if t is not None])
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum") * 0.5
    plain_grads = torch.autograd.grad(plain, [t for t in (hidden, weight, bias) if t is not None])
    torch.testing.assert_close(mine, plain)
    for a, b in zip(mine_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_linear_cross_entropy_row_weights_drop_rows():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 30, (6,), generator=g)
    keep = torch.tensor([1.0, 1, 0, 1, 0, 0])
    mine = linear_cross_entropy(hidden, weight, targets, row_weights=keep)
    (grad,) = torch.autograd.grad(mine, hidden)
    plain = F.cross_entropy(hidden[:3] @ weight.t(), targets[:3], reduction="none")
    plain = plain[torch.tensor([0, 1])].sum() + F.cross_entropy(hidden[3:4] @ weight.t(), targets[3:4], reduction="sum")
    torch.testing.assert_close(mine, plain)
    assert grad[keep == 0].abs().max() == 0


TRITON_CHECK = textwrap.dedent("""
    import torch
    from tunelab.accel.kernels.cross_entropy import rows_loss_torch, rows_loss_triton

    g = torch.Generator().manual_seed(0)
    for dtype, vocab, block in ((torch.float32, 1000, 256), (torch.bfloat16, 777, 128), (torch.float32, 64, 64)):
        logits = (torch.randn(5, vocab, generator=g) * 4).to(dtype)
        targets = torch.randint(0, vocab, (5,), generator=g)
        targets[0] = vocab - 1  # the last column, in the last (partial) block
        for weights in (None, torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0])):
            want_loss, want_grad = rows_loss_torch(logits.clone(), targets, weights, True)
            inplace = logits.clone()
            loss = rows_loss_triton(inplace, targets, weights, True, block=block, num_warps=1)
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
            rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (8e-3, 1e-4)  # bf16: one rounding
            torch.testing.assert_close(inplace.float(), want_grad.to(dtype).float(), rtol=rtol, atol=atol)
            only_loss = logits.clone()
            torch.testing.assert_close(rows_loss_triton(only_loss, targets, weights, False, block=block,
                                                        num_warps=1), want_loss, rtol=1e-5, atol=1e-5)
            assert torch.equal(only_loss, logits)  # no gradient asked: the logits are left alone
    print("triton kernel ok")
""")


def test_triton_kernel_matches_torch_path_in_the_interpreter():
    run_interpreted(TRITON_CHECK, "triton kernel ok")


def test_cpu_tensors_take_the_torch_path():
    assert not cross_entropy.triton_usable(torch.zeros(2, 3))
