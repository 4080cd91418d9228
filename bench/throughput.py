"""Training throughput: the reference recipe and tunelab, side by side, in one process.

    python bench/throughput.py --data huanhuan.json --tokenizer tokenizers/qwen2   # GPU: the full table
    python bench/throughput.py --data d.json --tokenizer tok/ --cpu                # CPU: tiny model, harness check

Reports real (non-pad) tokens/s over a fixed number of optimizer steps after warmup, MFU
(4N FLOPs per real token, N = the base model's parameters: forward 2N + activation
gradients 2N, frozen weights get none) over this card's bf16 matmul peak measured in the
same process, peak GPU memory, the time 3 epochs would take at that rate, and the ratio to
the matching reference row. Writes every number to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import reference  # noqa: E402
import tunelab_loop  # noqa: E402
from common import matmul_peak_tflops, reference_features, tunelab_rows  # noqa: E402

# name: (runner, shape, method, options, reference row it is compared with)
TUNELAB_LORA = dict(batch_size=40, micro_batch_size=10, lr=1e-4, packing="on")
CASES = {
    "ref-lora-1.5b-gc": ("reference", "qwen2-1.5b", "lora", dict(gradient_checkpointing=True), None),
    "ref-lora-1.5b": ("reference", "qwen2-1.5b", "lora", dict(gradient_checkpointing=False), None),
    "ref-lora-0.5b-gc": ("reference", "qwen2-0.5b", "lora", dict(gradient_checkpointing=True), None),
    "ref-ptuning-1.5b": ("reference", "qwen2-1.5b", "ptuning", dict(gradient_checkpointing=False), None),
    # tunelab defaults: packed, varlen attention, loss on supervised positions, CUDA graphs
    "lora-1.5b": ("tunelab", "qwen2-1.5b", "lora", TUNELAB_LORA, "ref-lora-1.5b-gc"),
    "lora-1.5b-lowmem": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, micro_batch_tokens=512),
                         "ref-lora-1.5b-gc"),
    "lora-1.5b-lowmem768": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, micro_batch_tokens=768),
                            "ref-lora-1.5b-gc"),
    "lora-1.5b-lowmem1024": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, micro_batch_tokens=1024),
                             "ref-lora-1.5b-gc"),
    "lora-0.5b": ("tunelab", "qwen2-0.5b", "lora", TUNELAB_LORA, "ref-lora-0.5b-gc"),
    "lora-7b-lowmem": ("tunelab", "qwen2-7b", "lora", dict(TUNELAB_LORA, micro_batch_tokens=768), None),
    "ptuning-1.5b": ("tunelab", "qwen2-1.5b", "ptuning", dict(batch_size=4, micro_batch_size=4, lr=1e-4),
                     "ref-ptuning-1.5b"),
    # levers, one at a time
    "lora-1.5b-eager": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, cuda_graphs=False), "ref-lora-1.5b-gc"),
    # the eager path's host cost, lever by lever: Triton's launches against torch's kernels
    "lora-1.5b-eager-torch-dropout": ("tunelab", "qwen2-1.5b", "lora",
                                      dict(TUNELAB_LORA, cuda_graphs=False, lora_triton=False), "ref-lora-1.5b-gc"),
    "lora-1.5b-eager-torch-kernels": ("tunelab", "qwen2-1.5b", "lora",
                                      dict(TUNELAB_LORA, cuda_graphs=False, kernels="torch"), "ref-lora-1.5b-gc"),
    "lora-1.5b-eager-unfused": ("tunelab", "qwen2-1.5b", "lora",
                                dict(TUNELAB_LORA, cuda_graphs=False, fuse_lora=False, kernels="torch"),
                                "ref-lora-1.5b-gc"),
    "lora-1.5b-padded": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, packing="off"), "ref-lora-1.5b-gc"),
    "lora-1.5b-gc": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, gradient_checkpointing=True),
                     "ref-lora-1.5b-gc"),
    "lora-1.5b-compile": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, cuda_graphs=False, compile=True),
                          "ref-lora-1.5b-gc"),
    "lora-1.5b-unfolded": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, fuse_lora="unfolded"),
                           "ref-lora-1.5b-gc"),
    "lora-1.5b-alone": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, fuse_lora="alone"), "ref-lora-1.5b-gc"),
    "lora-1.5b-torch-dropout": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, lora_triton=False),
                                "ref-lora-1.5b-gc"),
    # candidates not yet timed on a GPU: the fused dropout pair (no kept copies; less memory, so
    # the low-memory modes get larger micro-batches in the same budget)
    "lora-1.5b-fused-dropout": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, lora_fused_dropout=True),
                                "ref-lora-1.5b-gc"),
    "lora-1.5b-lowmem-fused-dropout": ("tunelab", "qwen2-1.5b", "lora",
                                       dict(TUNELAB_LORA, micro_batch_tokens=512, lora_fused_dropout=True),
                                       "ref-lora-1.5b-gc"),
    "lora-1.5b-lowmem1024-fused-dropout": ("tunelab", "qwen2-1.5b", "lora",
                                           dict(TUNELAB_LORA, micro_batch_tokens=1024, lora_fused_dropout=True),
                                           "ref-lora-1.5b-gc"),
    "lora-7b-lowmem-fused-dropout": ("tunelab", "qwen2-7b", "lora",
                                     dict(TUNELAB_LORA, micro_batch_tokens=768, lora_fused_dropout=True), None),
    "lora-1.5b-fold-all": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, fold_ratio=1), "ref-lora-1.5b-gc"),
    "lora-1.5b-gc-freeze": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, gc_freeze=True), "ref-lora-1.5b-gc"),
    "lora-1.5b-repeat-kv": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, flash_gqa=False), "ref-lora-1.5b-gc"),
    "lora-1.5b-liger-norm": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, fast_norm=False), "ref-lora-1.5b-gc"),
    "lora-1.5b-torch-ce": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, ce_kernel=False), "ref-lora-1.5b-gc"),
    "lora-1.5b-unfused": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, fuse_lora=False, kernels="torch"),
                          "ref-lora-1.5b-gc"),
    "lora-1.5b-torch-kernels": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, kernels="torch"),
                                "ref-lora-1.5b-gc"),
    "ptuning-1.5b-torch-kernels": ("tunelab", "qwen2-1.5b", "ptuning",
                                   dict(batch_size=4, micro_batch_size=4, lr=1e-4, kernels="torch"), "ref-ptuning-1.5b"),
    "lora-1.5b-compile-graphs": ("tunelab", "qwen2-1.5b", "lora", dict(TUNELAB_LORA, compile=True),
                                 "ref-lora-1.5b-gc"),
    "lora-1.5b-compile-graphs-unfused": ("tunelab", "qwen2-1.5b", "lora",
                                         dict(TUNELAB_LORA, compile=True, fuse_lora=False), "ref-lora-1.5b-gc"),
    "lora-7b-gc": ("tunelab", "qwen2-7b", "lora", dict(TUNELAB_LORA, gradient_checkpointing=True), None),
    "ptuning-1.5b-b40": ("tunelab", "qwen2-1.5b", "ptuning", dict(batch_size=40, micro_batch_size=40, lr=1e-4),
                         "ref-ptuning-1.5b"),
}
DEFAULT_GPU = ["ref-lora-1.5b-gc", "ref-lora-1.5b", "ref-lora-0.5b-gc", "ref-ptuning-1.5b", "lora-1.5b",
               "lora-1.5b-lowmem", "lora-0.5b", "lora-7b-lowmem", "ptuning-1.5b", "lora-1.5b-eager",
               "lora-1.5b-padded", "lora-1.5b-gc", "lora-7b-gc", "ptuning-1.5b-b40"]
DEFAULT_CPU = ["ref-lora-1.5b-gc", "ref-ptuning-1.5b", "lora-1.5b", "lora-1.5b-padded", "ptuning-1.5b"]


def run_case(name: str, args, data: dict, device, dtype, peak: float) -> dict:
    runner, shape, method, options, _ = CASES[name]
    shape = "tiny" if args.cpu else shape
    options = dict(options)
    if args.cpu:  # the harness check: 8 rows a step instead of 40, so CI stays fast
        if runner == "reference":
            options["settings"] = dict(batch=2, accumulation=2 if method == "lora" else 1)
        else:
            options.update(batch_size=8, micro_batch_size=4)
    started = time.perf_counter()
    if runner == "reference":
        steps, warmup = (args.ref_steps, args.ref_warmup)
        if method == "ptuning":  # 4 rows a step: more steps for the same measuring time
            steps, warmup = steps * 5, warmup * 2
        result = reference.run(shape, method, data["features"], data["tokenizer"], device, dtype,
                               steps, warmup, **options)
        epoch_tokens = data["reference_epoch_tokens"]
    else:
        from tunelab.config import TrainConfig

        fuse_lora = options.pop("fuse_lora", True)
        ce_kernel = options.pop("ce_kernel", True)
        lora_triton = options.pop("lora_triton", True)
        fused_dropout = options.pop("lora_fused_dropout", False)
        fast_norm = options.pop("fast_norm", True)
        flash_gqa = options.pop("flash_gqa", True)
        gc_freeze = options.pop("gc_freeze", False)
        fold_ratio = options.pop("fold_ratio", 4)
        cfg = replace(TrainConfig(), **options)
        profile = f"{args.profile}/{name}.txt" if args.profile and device.type == "cuda" else None
        result = tunelab_loop.run(shape, method, data["rows"], data["tokenizer"], device, dtype,
                                  args.steps, args.warmup, cfg, fuse_lora=fuse_lora, ce_kernel=ce_kernel,
                                  lora_triton=lora_triton, lora_fused_dropout=fused_dropout, fast_norm=fast_norm,
                                  flash_gqa=flash_gqa, gc_freeze=gc_freeze, fold_ratio=fold_ratio,
                                  profile=profile)
        result.update(fuse_lora=fuse_lora, ce_kernel=ce_kernel, lora_triton=lora_triton,
                      lora_fused_dropout=fused_dropout, fast_norm=fast_norm,
                      flash_gqa=flash_gqa, fold_ratio=fold_ratio)
        result["settings"] = {k: getattr(cfg, k) for k in ("batch_size", "micro_batch_size", "micro_batch_tokens",
                                                          "packing", "gradient_checkpointing")}
        result["compile"] = cfg.compile
        epoch_tokens = data["tunelab_epoch_tokens"]
    result.update(case=name, runner=runner, shape=shape, method=method, wall_s=time.perf_counter() - started)
    result["mfu"] = 4 * result["params"] * result["tokens_per_s"] / (peak * 1e12)
    result["three_epochs_min"] = 3 * epoch_tokens / result["tokens_per_s"] / 60
    return result


def learns(r: dict) -> str:
    """A tunelab case's learning check, measured in the same run as its speed."""
    if "learns" not in r:
        return ""
    verdict = "yes" if r["learns"] else "**NO**"
    return (f"{verdict} ({r['probe_loss_before']:.3f} -> {r['probe_loss_after']:.3f}, "
            f"{r['probe_loss_plain_peft']:.3f})")


def table(results: dict, header: str) -> str:
    lines = [header, "", "| case | shape | method | runner | real tokens/s | MFU | peak GiB | 3 epochs (min) | x reference "
             "| learns (probe loss before -> after, plain PEFT) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        ref = CASES[name][4]
        ratio = (f"{r['tokens_per_s'] / results[ref]['tokens_per_s']:.1f}x vs {ref}"
                 if ref in results else "")
        lines.append(f"| {name} | {r['shape']} | {r['method']} | {r['runner']} | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {r['three_epochs_min']:.2f} | {ratio} | "
                     f"{learns(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="huanhuan.json (alpaca rows)")
    parser.add_argument("--tokenizer", required=True, help="a ChatML tokenizer directory (Qwen2's)")
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU: checks the harness")
    parser.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)}")
    parser.add_argument("--steps", type=int, default=30, help="tunelab optimizer steps measured")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ref-steps", type=int, default=6, help="reference optimizer steps measured")
    parser.add_argument("--ref-warmup", type=int, default=2)
    parser.add_argument("--limit", type=int, help="use the first N rows only")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--profile", help="GPU: write a kernel profile of 3 steps of each tunelab case here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    args.cpu = device.type == "cpu"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    features = reference_features(args.data, tokenizer)[:args.limit]
    rows = tunelab_rows(args.data, tokenizer)[:args.limit]
    data = {"tokenizer": tokenizer, "features": features, "rows": rows,
            "reference_epoch_tokens": sum(len(f["input_ids"]) for f in features),
            "tunelab_epoch_tokens": sum(len(r.input_ids) for r in rows)}
    peak = matmul_peak_tflops(device) if device.type == "cuda" else 1.0
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {card}; torch {torch.__version__}; bf16 matmul peak {peak:.0f} TFLOP/s; "
          f"{len(rows)} rows; epoch tokens: reference {data['reference_epoch_tokens']:,}, "
          f"tunelab {data['tunelab_epoch_tokens']:,}", flush=True)
    results = {}
    report = {"device": card, "torch": torch.__version__, "peak_tflops": peak, "results": results}
    for name in args.cases or (DEFAULT_CPU if args.cpu else DEFAULT_GPU):
        try:
            results[name] = run_case(name, args, data, device, dtype, peak)
            r = results[name]
            print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB, "
                  f"MFU {100 * r['mfu']:.1f}% ({r['wall_s']:.0f} s) "
                  f"{ {k: r[k] for k in ('liger', 'cuda_graphs', 'graphs_captured', 'graph_failure', 'forwards_per_step', 'first_pass_seconds', 'host_ms_per_step', 'wait_ms_per_step') if k in r} }",
                  flush=True)
        except Exception as err:  # one failing case must not lose the others' numbers
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
            results[name] = None
        if args.json:  # after every case: a call that runs out of time keeps the cases it finished
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    done = {k: v for k, v in results.items() if v}
    header = (f"{card}, torch {torch.__version__}, bf16 peak {peak:.0f} TFLOP/s, "
              f"{time.strftime('%Y-%m-%d')}")
    print(table(done, header))
    return report


if __name__ == "__main__":
    main()
