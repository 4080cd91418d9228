"""Micro-benchmarks of the pieces of a training step that tunelab writes itself (GPU).

    python bench/kernels_bench.py --json $OUT/kernels.json

- `cross_entropy`: a chunk of logits -> (loss, gradient): the Triton kernel at several
  block sizes against the torch path, same inputs, with the largest difference;
- `dropout`: fused LoRA's dropout kernels (`accel/kernels/lora_dropout.py`: a group's G masks and
  low-rank products in one kernel, its input and A gradients in another) against torch ops;
- `norm` (`--norm`): RMSNorm with a frozen weight, liger's kernels against `accel/kernels/rms_norm.py`'s;
- `refresh`: rebuilding the compute copies of every LoRA weight of a Qwen2-1.5B shape.

`--sweep SECONDS` instead times each LoRA dropout kernel under the launch settings of
`SWEEP` (tile sizes, warps), to choose lora_dropout's constants.

Times are medians of CUDA-graph replays timed with CUDA events, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    from tunelab.accel.kernels.cross_entropy import rows_loss_torch, rows_loss_triton

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
    """Forward (masks + low-rank products) and backward (input gradient + A's gradients) of
    fused LoRA's dropout for each group shape of Qwen2-1.5B: the default Triton pair
    (`copies`), the mask-bits pair (`fused`) and torch ops (`torch`); errors against torch ops
    given the same masks."""
    from tunelab.accel.kernels import lora_dropout as k

    out = {}
    for copies, width in ((3, 1536), (2, 1536), (1, 1536), (1, 8960)):
        rows = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        grad_low = torch.randn(copies, tokens, 8, device="cuda", dtype=torch.bfloat16)
        a = (torch.randn(copies, 8, width, device="cuda") / width ** 0.5).to(torch.bfloat16)
        add = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        case = {}
        for name, use_triton, fused in (("copies", True, False), ("fused", True, True), ("torch", False, False)):
            choice = {"bits": fused, "triton_kernels": use_triton}
            low, drawn = k.dropout_low(rows, a, 0.1, **choice)
            case[f"{name}_forward_us"] = median_us(lambda: k.dropout_low(rows, a, 0.1, **choice))
            case[f"{name}_backward_us"] = median_us(
                lambda: k.dropout_low_backward(grad_low, a, drawn, rows, 0.1, 2.0, add=add, triton_kernels=use_triton))
            if name == "torch":
                continue
            masks = k.unpack(drawn[0], width) if fused else drawn[1]
            case[f"{name}_keep_rate"] = masks.float().mean().item()
            want_low = torch.bmm(rows.float() * masks / 0.9, a.float().transpose(1, 2))
            case[f"{name}_low_rel_error"] = ((low.float() - want_low).norm() / want_low.norm()).item()
            got_x, got_a = k.dropout_low_backward(grad_low, a, drawn, rows, 0.1, 2.0, add=add)
            dropped = (rows.float() * masks / 0.9).to(rows.dtype)
            want_x, want_a = k.dropout_low_backward(grad_low, a, (dropped, masks), rows, 0.1, 2.0, add=add,
                                                    triton_kernels=False)
            case[f"{name}_grad_x_rel_error"] = ((got_x.float() - want_x.float()).norm() / want_x.float().norm()).item()
            case[f"{name}_grad_a_rel_error"] = ((got_a - want_a).norm() / want_a.norm()).item()
        out[f"{copies}x{width}"] = case
    return out


# launch settings of lora_dropout to try: module constants -> values
SWEEP = {
    "dropout_copies": (("_BLOCK", "_COPIES_WARPS"),
                       [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (8192, 16), (16384, 8), (16384, 16)]),
    "masked_low_rank_sum": (("_SUM_ROWS", "_SUM_COLS", "_SUM_WARPS"),
                            [(32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8),
                             (128, 64, 4), (32, 256, 4)]),
    "fused_forward": (("_FORWARD_ROWS", "_FORWARD_CHUNKS", "_FORWARD_WARPS"),
                      [(16, 1, 4), (32, 1, 4), (32, 1, 8), (64, 1, 4), (64, 1, 8), (32, 2, 8), (64, 2, 8),
                       (128, 1, 8)]),
    "fused_backward": (("_BACKWARD_ROWS", "_BACKWARD_WARPS"), [(32, 4), (32, 8), (64, 8), (128, 8), (64, 16),
                                                                (128, 16)]),
}


def sweep_cases(tokens: int, seconds: float) -> dict:
    """Each LoRA dropout kernel (with what its path adds: the split sums of the fused pair)
    timed under each launch setting of `SWEEP`, for every group shape of Qwen2-1.5B; the
    totals over the four shapes (one of each a layer) and the fastest setting. Stops trying
    new settings after `seconds`."""
    from tunelab.accel.kernels import lora_dropout as k

    shapes = ((3, 1536), (2, 1536), (1, 1536), (1, 8960))
    inputs = {}
    for copies, width in shapes:
        rows = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        a = (torch.randn(copies, 8, width, device="cuda") / width ** 0.5).to(torch.bfloat16)
        grad_low = torch.randn(copies, tokens, 8, device="cuda", dtype=torch.bfloat16)
        add = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        bits = k.dropout_low(rows, a, 0.1, bits=True)[1]
        mask = k.dropout_copies(rows, 0.1, copies)[1]
        inputs[(copies, width)] = rows, a, grad_low, add, bits, mask

    def timed(kernel: str, copies: int, width: int) -> float:
        rows, a, grad_low, add, bits, mask = inputs[(copies, width)]
        if kernel == "dropout_copies":
            return median_us(lambda: k.dropout_copies(rows, 0.1, copies))
        if kernel == "masked_low_rank_sum":
            return median_us(lambda: k.masked_low_rank_sum(grad_low, a, mask, 0.1, add=add))
        if kernel == "fused_forward":
            return median_us(lambda: k.dropout_low(rows, a, 0.1, bits=True))
        return median_us(lambda: k.dropout_low_backward(grad_low, a, bits, rows, 0.1, 2.0, add=add))

    start, out = time.perf_counter(), {}
    for kernel, (names, settings) in SWEEP.items():
        default = tuple(getattr(k, n) for n in names)
        results = {}
        for setting in [default] + [s for s in settings if s != default]:
            if time.perf_counter() - start > seconds:
                break
            for n, v in zip(names, setting):
                setattr(k, n, v)
            try:
                per_shape = {f"{c}x{w}": timed(kernel, c, w) for c, w in shapes}
            except Exception as err:  # a setting that does not compile or launch
                per_shape = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            finally:
                for n, v in zip(names, default):
                    setattr(k, n, v)
            if "error" not in per_shape:
                per_shape["total_us"] = sum(per_shape.values())
            results["-".join(map(str, setting))] = per_shape
        ok = {name: r["total_us"] for name, r in results.items() if "total_us" in r}
        out[kernel] = {"settings": names, "default": "-".join(map(str, default)),
                       "best": min(ok, key=ok.get) if ok else None, "results": results}
        print(kernel, "default", out[kernel]["default"], ok, flush=True)
    return out


NORM_SETTINGS = [(1, 4), (1, 2), (1, 8), (2, 4), (4, 4), (8, 8)]  # rms_norm's (_ROWS, _WARPS) to try


def kernel_us(fn, repeats: int = 20) -> dict:
    """Mean GPU time of each kernel `fn` launches, from the profiler (for work that cannot be
    captured in a CUDA graph: liger's norm backward touches the legacy stream), in us."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:60]] = totals.get(e.name[:60], 0.0) + e.device_time / repeats
    return totals


def norm_cases(tokens: int) -> dict:
    """RMSNorm forward + backward (frozen weight) of the 1.5B and 7B hidden sizes: the kernels
    of liger against `tunelab.rms_norm` under each launch setting of `NORM_SETTINGS`, with
    the largest differences from liger's output and input gradient."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    from tunelab.accel.kernels import rms_norm

    out, default = {}, (rms_norm._ROWS, rms_norm._WARPS)
    for width in (1536, 3584):
        liger = LigerRMSNorm(width, eps=1e-6).to("cuda", torch.bfloat16).requires_grad_(False)
        liger.weight.add_(torch.randn(width, device="cuda", dtype=torch.bfloat16) * 0.1)
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)

        def pair(forward):
            y = forward(x)
            (grad,) = torch.autograd.grad(y, x, dy.clone())  # liger writes dx into dy's buffer
            return y, grad

        want_y, want_dx = pair(liger)
        case = {"liger": kernel_us(lambda: pair(liger))}
        for setting in NORM_SETTINGS:
            rms_norm._ROWS, rms_norm._WARPS = setting
            ours = lambda t: rms_norm.rms_norm(t, liger.weight, 1e-6)  # noqa: E731
            y, dx = pair(ours)
            case["-".join(map(str, setting))] = {
                "kernels_us": kernel_us(lambda: pair(ours)),
                "max_y_diff": (y.float() - want_y.float()).abs().max().item(),
                "max_dx_diff": (dx.float() - want_dx.float()).abs().max().item()}
        rms_norm._ROWS, rms_norm._WARPS = default
        out[f"{tokens}x{width}"] = case
    return out


def refresh_case() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import build_model
    from tunelab.methods import get
    from tunelab.accel import lora as lora_fused

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
    parser.add_argument("--norm", action="store_true", help="only time the RMSNorm kernels (norm_cases)")
    parser.add_argument("--sweep", type=float, metavar="SECONDS",
                        help="only time the LoRA dropout kernels' launch settings (SWEEP), for at most this long")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.norm:
        report["norm"] = norm_cases(args.tokens)
    elif args.sweep:
        report["sweep"] = sweep_cases(args.tokens, args.sweep)
    else:
        report.update({"cross_entropy": cross_entropy_cases(1024, 151936), "dropout": dropout_cases(args.tokens),
                       "refresh": refresh_case()})
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
