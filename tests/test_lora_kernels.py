"""The Triton kernels of fused LoRA's dropout against the torch ops they replace, on the CPU
through Triton's interpreter (a subprocess: the interpreter is chosen when kernels are
defined). On CUDA the same kernels run compiled (bench/kernels_bench.py times them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tunelab.methods import lora_kernels

CHECK = textwrap.dedent("""
    import torch
    from tunelab.methods import lora_kernels as k

    k.usable = lambda x: True  # CPU tensors through the interpreted kernels
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for copies, rows, width in ((3, 37, 300), (1, 5, 64), (2, 64, 2048)):
            x = torch.randn(rows, width).to(dtype)
            kept, mask = k.dropout_copies(x, 0.25, copies)
            assert kept.shape == mask.shape == (copies, rows, width) and mask.dtype == torch.bool
            torch.testing.assert_close(kept, (x.float() * mask / 0.75).to(dtype))  # every element written
            if rows * width >= 4096:
                assert abs(mask.float().mean().item() - 0.75) < 0.03, mask.float().mean()
            if copies > 1:
                assert not torch.equal(mask[0], mask[1])  # each copy its own mask
            again, mask_again = k.dropout_copies(x, 0.25, copies)
            assert not torch.equal(mask, mask_again)  # a fresh seed every call

            low = torch.randn(copies, rows, 8).to(dtype)
            a = torch.randn(copies, 8, width).to(dtype)
            for m in (mask, None):
                want = torch.bmm(low.float(), a.float())
                if m is not None:
                    want = want * m / 0.75
                want = want.sum(0)
                got = k.masked_low_rank_sum(low, a, m, 0.25)
                assert got.dtype == dtype and got.shape == (rows, width)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    print("lora kernels ok")
""")


def test_triton_kernels_match_torch_ops_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora kernels ok" in result.stdout


def test_cpu_takes_the_torch_ops():
    x = torch.randn(4, 6)
    assert not lora_kernels.usable(x)
    kept, mask = lora_kernels.dropout_copies(x, 0.5, 2)
    torch.testing.assert_close(kept, x * mask / 0.5)
    low, a = torch.randn(2, 4, 3), torch.randn(2, 3, 6)
    torch.testing.assert_close(lora_kernels.masked_low_rank_sum(low, a, mask, 0.5),
                               (torch.bmm(low, a) * mask / 0.5).sum(0))
