"""Micro-benchmarks of the pieces of a training step that tunelab writes itself (GPU).

    python bench/kernels_bench.py --json $OUT/kernels.json

- `cross_entropy`: a chunk of logits -> (loss, gradient): the Triton kernel at several
  block sizes against the torch path, same inputs, with the largest difference;
- `dropout`: the G masks of a LoRA group drawn in one kernel (as `lora_fused.draw_dropout`)
  against G separate draws and a contiguous copy first;
- `refresh`: rebuilding the compute copies of every LoRA weight of a Qwen2-1.5B shape.

Times are medians of CUDA-event timings after warmup, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def median_us(fn, repeats: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def cross_entropy_cases(rows: int, vocab: int) -> dict:
    from tunelab.cross_entropy import rows_loss_torch, rows_loss_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    weights = (torch.rand(rows, device="cuda", generator=g) > 0.1).float()
    want_loss, want_grad = rows_loss_torch(logits.clone(), targets, weights, True)
    work = logits.clone()
    out = {"rows": rows, "vocab": vocab,
           "torch_us": median_us(lambda: rows_loss_torch(work.copy_(logits), targets, weights, True), 20)}
    for block, warps in ((2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)):
        got = logits.clone()
        loss = rows_loss_triton(got, targets, weights, True, block=block, num_warps=warps)
        out[f"triton_{block}_{warps}"] = {
            "us": median_us(lambda: rows_loss_triton(work.copy_(logits), targets, weights, True, block, warps)),
            "max_loss_diff": (loss - want_loss).abs().max().item(),
            "max_grad_diff": (got.float() - want_grad).abs().max().item()}
    out["copy_us"] = median_us(lambda: work.copy_(logits))  # included in every timing above
    return out


def dropout_cases(tokens: int) -> dict:
    from tunelab.methods.lora_fused import draw_dropout

    out = {}
    for copies, width in ((3, 1536), (2, 1536), (1, 1536), (1, 8960)):
        rows = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        out[f"{copies}x{width}"] = {
            "one_draw_us": median_us(lambda: draw_dropout(rows, 0.1, copies)),
            "separate_draws_us": median_us(lambda: [torch.native_dropout(rows, 0.1, True) for _ in range(copies)]),
            "copy_then_draw_us": median_us(lambda: torch.native_dropout(
                rows.expand(copies, *rows.shape).contiguous(), 0.1, True)),
            "bernoulli_mul_us": median_us(lambda: rows * torch.empty(
                (copies, *rows.shape), device="cuda", dtype=torch.bfloat16).bernoulli_(0.9).mul_(1 / 0.9)),
        }
    return out


def refresh_case() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import build_model
    from tunelab.methods import get, lora_fused

    base = build_model("qwen2-1.5b", torch.device("cuda"), torch.bfloat16, vocab_size=151936)
    net = get("lora").apply(base, get("lora").config_cls())
    lora_fused.fuse(net)
    groups = lora_fused.groups_of(net)
    store = groups[0].store
    out = {"groups": len(groups), "tensors": len(store.params),
           "refresh_us": median_us(store.refresh)}
    del net, base
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--tokens", type=int, default=2816, help="packed tokens of a step (graph bucket)")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cross_entropy": cross_entropy_cases(1024, 151936),
              "dropout": dropout_cases(args.tokens), "refresh": refresh_case()}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
