"""Every Triton kernel of tunelab compiles for an H100/H200 (sm_90) on this GPU-less machine
(Triton's code generator and bundled ptxas, `bench/kernels_compile.py`), and the fused LoRA
dropout pair keeps its block sizes free of register spills. The interpreter tests check what
the kernels compute; a kernel the interpreter runs may still fail to compile."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_kernels_compile_for_sm90(monkeypatch):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels_compile

    results = kernels_compile.main(["--quick"])["kernels"]
    assert len(results) == len(kernels_compile.configurations(quick=True))
    for label, info in results.items():
        assert 0 < info["registers"] <= 255, (label, info)
        if "fused" in label:
            assert info["spill_stores"] == info["spill_loads"] == 0, (label, info)
