"""Data-parallel scaling of tunelab's training step: tokens/s, scaling efficiency, peak memory
and the held-out loss after a fixed budget, on 1, 2, 4 ... GPUs.

    torchrun --nproc_per_node N bench/scaling.py --data huanhuan.json --tokenizer tok/ \
        --shape qwen2-1.5b --json results/scaling_1.5b_N.json           # once per N
    python bench/scaling.py --table results/scaling_1.5b_*.json       # the table, efficiency vs N=1
    torchrun --nproc_per_node 2 bench/scaling.py --cpu --data d.json --tokenizer tok/   # CPU harness check

Each N trains the same random-weight model (the published Qwen2 shape, `common.build_model`)
with LoRA on the same rows in the same order with the same global batch (`--batch-size`
rows an optimizer step, split across the processes by tokens, as `tunelab train` under
torchrun does: `train.queue_step` with the process's `distributed.World`). The timed steps
follow `--warmup` steps and one untimed pass over the same steps (CUDA graphs are captured
there); tokens/s counts the real tokens of the whole global batch. After the timed steps the
held-out loss (rows never trained on, split across the processes) is the same budget's
result on every N: equal within seed spread is what "learns the same" means here. Scaling
efficiency = tokens/s on N / (N x tokens/s on 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import Clock, build_model, fresh_memory, parameter_count, peak_gib, tunelab_rows  # noqa: E402
from tunelab_loop import run_steps  # noqa: E402


def measure(args, world) -> dict:
    from transformers import AutoTokenizer

    from tunelab import accel
    from tunelab.accel import Levers
    from tunelab.config import TrainConfig
    from tunelab.methods import METHODS
    from tunelab.step import evaluate_loss

    device = world.device if world.size > 1 else torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    shape = "tiny" if args.cpu else args.shape
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = tunelab_rows(args.data, tokenizer)[:args.limit]
    held_out, rows = rows[:args.val_rows], rows[args.val_rows:]
    cfg = replace(TrainConfig(), batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                  micro_batch_tokens=args.micro_batch_tokens, lr=args.lr, packing="on",
                  cuda_graphs=not args.no_graphs, seed=args.seed)
    torch.manual_seed(args.seed)
    with fresh_memory(device):
        base = build_model(shape, device, dtype, vocab_size=len(tokenizer), seed=args.seed)
        method = METHODS[args.method]
        options = method.config_cls()
        if args.dropout is not None:
            options = replace(options, dropout=args.dropout)
        supports_packing, net = method.capabilities.supports_packing, method.apply(base, options)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        world.broadcast(params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=device.type in ("cuda", "cpu"))
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if device.type == "cuda" and dtype == torch.bfloat16 else nullcontext())
        steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
        with accel.prepare(net, supports_packing, device, autocast, tokenizer.pad_token_id,
                           Levers.from_train(cfg)) as fast:  # as train() does

            def loop(indices):
                return run_steps(indices, rows, cfg, steps_per_epoch, net, fast, device, autocast, params,
                                 optimizer, world=world)

            before = evaluate_loss(net, held_out, cfg, fast, device, autocast, world)
            net.train()
            loop(range(args.warmup))
            measured = list(range(args.warmup, args.warmup + args.steps))
            loop(measured)  # untimed: graphs captured, allocator warm
            clock = Clock(device)
            world.sum(0.0)  # start the clock on every rank together
            clock.begin()
            tokens, loss, waited = loop(measured)
            clock.end()
            seconds = max(world.sum(clock.seconds)[0] / world.size, 1e-9)  # mean over the ranks
            after = evaluate_loss(net, held_out, cfg, fast, device, autocast, world)
            peak = peak_gib(device)
            peaks = [0.0] * world.size
            peaks[world.rank] = peak if math.isfinite(peak) else 0.0
            peaks = world.sum(*peaks)
        result = {
            "gpus": world.size, "shape": shape, "method": args.method, "seed": args.seed,
            "dropout": getattr(options, "dropout", None), "params": parameter_count(base),
            "batch_size": cfg.batch_size, "micro_batch_tokens": cfg.micro_batch_tokens,
            "steps": args.steps, "warmup": args.warmup, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "wait_ms_per_step": 1e3 * waited / args.steps,
            "peak_gib_per_gpu": max(peaks) if device.type == "cuda" else None,
            "peak_gib_by_rank": peaks if device.type == "cuda" else None,
            "held_out_rows": len(held_out), "held_out_loss_before": before, "held_out_loss_after": after,
            "optimizer_steps_trained": 2 * args.steps + args.warmup, "last_train_loss": loss,
            "cuda_graphs": fast.graphs is not None and not fast.graphs.failed,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }
        del net, base, optimizer, params, fast
    return result


def table(results: list[dict]) -> str:
    """Markdown: one row per (shape, GPU count), efficiency against the same shape's 1-GPU row."""
    lines = ["| shape | GPUs | tokens/s | speedup | scaling efficiency | peak GiB / GPU | held-out loss "
             "(before -> after) |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    ones = {r["shape"]: r for r in results if r["gpus"] == 1}
    for r in sorted(results, key=lambda r: (r["shape"], r["gpus"])):
        one = ones.get(r["shape"])
        speedup = r["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        peak = f"{r['peak_gib_per_gpu']:.2f}" if r.get("peak_gib_per_gpu") is not None else "-"
        lines.append(f"| {r['shape']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {speedup:.2f}x | "
                     f"{100 * speedup / r['gpus']:.0f}% | {peak} | {r['held_out_loss_before']:.4f} -> "
                     f"{r['held_out_loss_after']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="huanhuan.json (alpaca rows)")
    parser.add_argument("--tokenizer", help="a ChatML tokenizer directory (Qwen2's)")
    parser.add_argument("--shape", default="qwen2-1.5b", help="qwen2-1.5b, qwen2-7b, ... (common.SHAPES)")
    parser.add_argument("--method", default="lora", help="a tunelab method (lora, qlora, ...)")
    parser.add_argument("--dropout", type=float, help="the method's dropout (default: its own; 0 makes "
                        "every GPU count compute the same losses up to rounding)")
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU over gloo: checks the harness")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps timed")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=40, help="rows per optimizer step, all GPUs together")
    parser.add_argument("--micro-batch-size", type=int, default=10)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--val-rows", type=int, default=64, help="held-out rows (the data's first ones)")
    parser.add_argument("--limit", type=int, help="use the first N rows only")
    parser.add_argument("--no-graphs", action="store_true", help="eager steps instead of CUDA graphs")
    parser.add_argument("--json", help="write this GPU count's result here (rank 0)")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of earlier results and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(Path(p).read_text()) for p in args.table]))
        return None
    if not (args.data and args.tokenizer):
        parser.error("--data and --tokenizer are needed to measure")

    from tunelab.distributed import init

    world = init("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)
    started = time.perf_counter()
    result = measure(args, world)
    result["wall_s"] = time.perf_counter() - started
    if world.main:
        print(json.dumps(result, indent=1))
        print(table([result]))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
