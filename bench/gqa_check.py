"""Grouped-query attention through FlashAttention's own kernels (`accel.attention._FlashGQA`)
against keys and values repeated to every query head (GPU): outputs and all three input
gradients on packed rows of the Qwen2-1.5B attention shape, and each path's GPU time.

    python bench/gqa_check.py --json $OUT/gqa.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from kernels_bench import kernel_us
    from tunelab.accel import attention

    torch.manual_seed(0)
    lengths = torch.randint(5, 384, (40,))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to("cuda", torch.int32)
    tokens, longest = int(lengths.sum()), int(lengths.max())
    heads, kv_heads, dim = 12, 2, 128
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, flash_gqa in (("flash_gqa", True), ("repeat", False)):

        def both():
            out = attention.attend_segments(q, k, v, cu, longest, None, flash_gqa)
            return (out, *torch.autograd.grad(out, (q, k, v), grad))

        results[name] = {"values": both(), "kernels_us": kernel_us(both)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
              "native_enable_gqa": attention._VARLEN[2]}
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        a, b = results["flash_gqa"]["values"][i].float(), results["repeat"]["values"][i].float()
        report[f"max_{what}_diff"] = (a - b).abs().max().item()
        report[f"{what}_scale"] = b.abs().max().item()
    for name in results:
        report[f"{name}_kernels_us"] = results[name]["kernels_us"]
        report[f"{name}_total_us"] = sum(results[name]["kernels_us"].values())
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
