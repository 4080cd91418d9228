"""Compile tunelab's Triton kernels for a GPU target without a GPU (Triton's code generator and
its bundled ptxas), in the configurations Qwen2 shapes use, and report registers and spills.

    python bench/kernels_compile.py [--arch 90] [--json OUT]

The interpreter tests (`tests/test_lora_kernels.py`, `tests/test_cross_entropy.py`,
`tests/test_rms_norm.py`) check what
the kernels compute; this checks that they compile for the card and how much register
pressure the chosen block sizes cost (a spilling kernel waits on local memory). It runs on
the CPU machines and in CI (`tests/test_kernels_compile.py`); timing still needs a GPU
(`bench/kernels_bench.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LORA_COPIES = {"x_ptr": "*bf16", "kept_ptr": "*bf16", "mask_ptr": "*u8", "seed_ptr": "*i64", "numel": "i32",
               "counters_per_copy": "i32", "threshold": "i32", "scale": "fp32"}
LORA_MASKED = {"low_ptr": "*bf16", "a_ptr": "*bf16", "mask_ptr": "*u8", "add_ptr": "*bf16", "add_stride": "i32",
               "out_ptr": "*bf16", "rows": "i32", "width": "i32", "scale": "fp32"}
LORA_FORWARD = {"x_ptr": "*bf16", "a_ptr": "*bf16", "bits_ptr": "*u8", "out_ptr": "*fp32", "seed_ptr": "*i64",
                "rows": "i32", "width": "i32", "n_bytes": "i32", "chunks": "i32", "threshold": "i32", "scale": "fp32"}
LORA_BACKWARD = {"low_ptr": "*bf16", "a_ptr": "*bf16", "bits_ptr": "*u8", "x_ptr": "*bf16", "add_ptr": "*bf16",
                 "add_stride": "i32", "out_ptr": "*bf16", "part_ptr": "*fp32", "coef_ptr": "*fp32", "rows": "i32",
                 "width": "i32", "n_bytes": "i32", "scale": "fp32", "coef": "fp32"}
NORM_FORWARD = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "rows": "i32",
                "cols": "i32", "eps": "fp32", "offset": "fp32"}
NORM_BACKWARD = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
                 "rows": "i32", "cols": "i32", "offset": "fp32"}
CROSS_ENTROPY = {"logits_ptr": "*bf16", "stride": "i32", "targets_ptr": "*i64", "weights_ptr": "*fp32",
                 "losses_ptr": "*fp32", "vocab": "i32"}


def configurations(quick: bool = False) -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel, signature, constexprs, warps) as the code launches them."""
    from tunelab.accel.kernels import cross_entropy as ce
    from tunelab.accel.kernels import rms_norm as norm
    from tunelab.accel.kernels import lora_dropout as k

    out = []
    for copies in ((3, 1) if quick else (3, 2, 1)):
        rank = 8
        kdim = max(16, rank)
        out.append((f"lora dropout_copies G={copies}", k._dropout_copies, LORA_COPIES,
                    {"COPIES": copies, "BLOCK": k._BLOCK}, k._COPIES_WARPS))
        out.append((f"lora masked_low_rank_sum G={copies}", k._masked_low_rank_sum, LORA_MASKED,
                    {"COPIES": copies, "RANK": rank, "K": kdim, "HAS_MASK": True, "HAS_ADD": copies == 2,
                     "EXACT": False, "BLOCK_ROWS": k._SUM_ROWS, "BLOCK_COLS": k._SUM_COLS}, k._SUM_WARPS))
        out.append((f"lora fused forward G={copies}", k._dropout_low, LORA_FORWARD,
                    {"COPIES": copies, "RANK": rank, "K": kdim, "SPLIT": k._FORWARD_CHUNKS, "EXACT": False,
                     "BLOCK_ROWS": k._FORWARD_ROWS, "SUB": k.SUB}, k._FORWARD_WARPS))
        out.append((f"lora fused backward G={copies}", k._dropout_low_backward, LORA_BACKWARD,
                    {"COPIES": copies, "RANK": rank, "K": kdim, "NEED_X": True, "HAS_ADD": copies == 2,
                     "PER_COPY": False, "EXACT": False, "BLOCK_ROWS": k._BACKWARD_ROWS, "SUB": k.SUB},
                    k._BACKWARD_WARPS))
    for block in (2048, 4096):  # hidden 1,536 and 3,584
        out.append((f"rms norm forward {block}", norm._forward, NORM_FORWARD, {"ROWS": norm._ROWS, "BLOCK": block},
                    norm._WARPS))
        out.append((f"rms norm backward {block}", norm._backward, NORM_BACKWARD,
                    {"ROWS": norm._ROWS, "BLOCK": block}, norm._WARPS))
    out.append(("cross entropy", ce._cross_entropy_rows, CROSS_ENTROPY,
                {"HAS_WEIGHTS": True, "WRITE_GRAD": True, "BLOCK": 4096}, 8))  # rows_loss_triton's defaults
    return out


def compile_kernel(kernel, signature: dict, constexprs: dict, warps: int, arch: int) -> dict:
    """Compile for sm_<arch>; registers and spills as ptxas reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in constexprs}},
                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="fewer group sizes (the tests)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import triton

    results = {"triton": triton.__version__, "arch": args.arch, "kernels": {}}
    for label, kernel, signature, constexprs, warps in configurations(args.quick):
        info = compile_kernel(kernel, signature, constexprs, warps, args.arch)
        info["warps"] = warps
        results["kernels"][label] = info
        print(f"{label:40s} {warps} warps: {info['registers']} registers, spills {info['spill_stores']} B stored /"
              f" {info['spill_loads']} B loaded", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
