"""tunelab's RMSNorm kernels (frozen weight) against the torch formula, on the CPU through
Triton's interpreter (a subprocess: the interpreter is chosen when kernels are defined)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import run_interpreted
from tunelab.accel.kernels import rms_norm

CHECK = textwrap.dedent("""
    import torch
    from tunelab.accel.kernels.rms_norm import rms_norm

    def reference(x, w, eps, offset):  # transformers' Llama/Qwen2 RMSNorm (liger's llama casting)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return (normed.float() * (w.float() + offset)).to(x.dtype)

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for shape, offset in (((3, 5, 96), 0.0), ((37, 100), 1.0), ((1, 8, 2048), 0.0)):
            x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
            w = (torch.rand(shape[-1]) + 0.5).to(dtype)
            got = rms_norm(x, w, 1e-6, offset)
            want_x = x.detach().clone().requires_grad_()
            want = reference(want_x, w, 1e-6, offset)
            assert got.dtype == dtype and got.shape == x.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
            dy = torch.randn(shape).to(dtype)
            got.backward(dy)
            xf = want_x.detach().float().requires_grad_()  # the gradient in fp32, as the kernel computes it
            ref32 = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.float() + offset)
            ref32.backward(dy.float())
            torch.testing.assert_close(x.grad.float(), xf.grad, rtol=tol, atol=tol * 4)
    try:
        rms_norm(x, w.requires_grad_(), 1e-6)
    except ValueError as err:
        assert "frozen" in str(err)
    else:
        raise AssertionError("a trainable weight was accepted")
    print("rms norm ok")
""")


def test_kernels_match_the_torch_formula_in_the_interpreter():
    run_interpreted(CHECK, "rms norm ok")


class LigerRMSNorm(torch.nn.Module):  # the attributes liger's module has; its forward is a stand-in
    def __init__(self, width: int, casting_mode: str = "llama"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width), requires_grad=False)
        self.variance_epsilon, self.offset, self.casting_mode = 1e-6, 0.0, casting_mode

    def forward(self, x):
        return x * 2


def test_fast_norms_routes_llama_cast_frozen_norms_and_puts_them_back(monkeypatch):
    pytest.importorskip("triton")
    patched = LigerRMSNorm(8)  # as liger patches a model's own norm: renamed through _get_name
    patched.__class__ = type("Qwen2RMSNorm", (LigerRMSNorm,), {"_get_name": lambda self: "LigerRMSNorm"})
    model = torch.nn.Sequential(LigerRMSNorm(8), LigerRMSNorm(8, casting_mode="gemma"), torch.nn.Linear(8, 8),
                                patched)
    called = []
    monkeypatch.setattr(rms_norm, "rms_norm", lambda x, w, eps, offset: called.append(eps) or x)
    x = torch.ones(2, 8)
    with rms_norm.fast_norms(model) as routed:
        assert routed == 2
        assert torch.equal(model[0](x), x * 2)  # CPU input: liger's forward (here the stand-in)
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        model[0](x)
        assert called == [1e-6]
        model[0].weight.requires_grad_(True)  # a trainable weight goes back to liger's kernels
        assert torch.equal(model[0](x), x * 2)
        monkeypatch.undo()
    assert "forward" not in vars(model[1]) and not hasattr(model[0], "_liger_forward")
    assert torch.equal(model[0](x), x * 2)
    with rms_norm.fast_norms(model, enabled=False) as routed:
        assert routed == 0
