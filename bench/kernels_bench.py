"""Micro-benchmarks of the pieces of a training step that tunelab writes itself (GPU).

    python bench/kernels_bench.py --json $OUT/kernels.json

- `cross_entropy`: a chunk of logits -> (loss, gradient): the Triton kernel at several
  block sizes against the torch path, same inputs, with the largest difference;
- `dropout`: fused LoRA's dropout kernels (`methods/lora_kernels.py`: the G masks of a
  group in one kernel, and the masked low-rank input gradient) against the torch ops;
- `refresh`: rebuilding the compute copies of every LoRA weight of a Qwen2-1.5B shape.

Times are medians of CUDA-graph replays timed with CUDA events, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def median_us(fn, repeats: int = 20, per_timing: int = 10) -> float:
    """Median time of `fn` replayed from a CUDA graph (no launch overhead: as inside a
    training step's graph), in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_timing):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_timing)
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
           "torch_us": median_us(lambda: rows_loss_torch(work.copy_(logits), targets, weights, True))}
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
    from tunelab.methods import lora_kernels

    out = {}
    for copies, width in ((3, 1536), (2, 1536), (1, 1536), (1, 8960)):
        rows = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        low = torch.randn(copies, tokens, 8, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(copies, 8, width, device="cuda", dtype=torch.bfloat16)
        case = {}
        for kernel in (True, False):
            lora_kernels.USE_TRITON = kernel
            kept, mask = lora_kernels.dropout_copies(rows, 0.1, copies)
            name = "triton" if kernel else "torch"
            case[f"{name}_draw_us"] = median_us(lambda: lora_kernels.dropout_copies(rows, 0.1, copies))
            case[f"{name}_backward_us"] = median_us(lambda: lora_kernels.masked_low_rank_sum(low, a, mask, 0.1))
            case[f"{name}_keep_rate"] = mask.float().mean().item()
            if kernel:
                case["triton_max_kept_error"] = (kept.float() - rows.float() * mask / 0.9).abs().max().item()
                lora_kernels.USE_TRITON = False
                want = lora_kernels.masked_low_rank_sum(low, a, mask, 0.1).float()
                lora_kernels.USE_TRITON = True
                got = lora_kernels.masked_low_rank_sum(low, a, mask, 0.1).float()
                case["triton_backward_rel_error"] = ((got - want).norm() / want.norm()).item()
        lora_kernels.USE_TRITON = True
        out[f"{copies}x{width}"] = case
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
