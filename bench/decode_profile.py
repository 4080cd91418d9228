"""Where a decoding step's time goes: the Engine's static path (fixed buffers, CUDA graphs)
and its dynamic path on a random-weight model, one batch at a time.

For each batch size it times (after a warm-up) the graph replay alone, the whole static step
(replay plus picking the token), and the dynamic path's step, then profiles a few static
steps with torch.profiler and prints the costliest operations (CPU and GPU time).

    python bench/decode_profile.py --tokenizer .carry/qwen2 --shape qwen2-1.5b --batch-sizes 1 64 256
    python bench/decode_profile.py --tokenizer TOK --shape tiny --device cpu     # the script's test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "src"), str(BENCH)]  # runs from a checkout too

from common import SYSTEM, build_model  # noqa: E402
from tunelab.config import GenerationConfig  # noqa: E402
from tunelab.generate import Engine  # noqa: E402
from tunelab.generate.static import capacity_for, static_attention_in  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shape", default="qwen2-1.5b")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=32, help="timed steps per measurement")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n, device) -> float:
    """Mean seconds per call of fn over n calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    from transformers import AutoTokenizer

    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = build_model(args.shape, device, dtype, vocab_size=len(tokenizer)).eval()
    engine = Engine(model, tokenizer, device)
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁？请简单介绍一下你自己。"}]
    prompt = engine.format.prompt_ids(question)
    results = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "prompt_tokens": len(prompt), "batches": []}
    for rows in args.batch_sizes:
        prompts = [prompt] * rows
        capacity = capacity_for(len(prompt), args.steps * 4 + 8)
        with torch.no_grad(), static_attention_in(engine.base):
            slots, logits, column = engine.decoder.prefill(engine.base, "base", prompts, capacity)
            token = logits.argmax(-1)
            state = {"column": column}

            def step():
                nonlocal token
                logits = engine.decoder.step(engine.base, "base", slots, token, state["column"])
                token = logits.float().argmax(-1)
                state["column"] += 1

            step()  # captures the graph (on a GPU)
            step_s = timed(step, args.steps, device)
            graph = slots.graphs.get("base")
            replay_s = timed(graph[0].replay, args.steps, device) if graph else None
            # the dynamic path: a whole batch, per new token
            gen = GenerationConfig(max_new_tokens=args.steps)
            engine.static = False
            engine.complete(prompts, GenerationConfig(max_new_tokens=2), rows, ignore_eos=True)
            dynamic_s = timed(lambda: engine.complete(prompts, gen, rows, ignore_eos=True), 1, device) / args.steps
            engine.static = device.type == "cuda"
            static_s = timed(lambda: engine.complete(prompts, gen, rows, ignore_eos=True), 1, device) / args.steps
            entry = {"rows": rows, "capacity": capacity, "static_step_ms": round(1e3 * step_s, 3),
                     "replay_ms": round(1e3 * replay_s, 3) if replay_s else None,
                     "static_per_token_ms": round(1e3 * static_s, 3),
                     "dynamic_per_token_ms": round(1e3 * dynamic_s, 3)}
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.profile_steps):
                    step()
                sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=14)
            entry["profile_top"] = table
        print(json.dumps({k: v for k, v in entry.items() if k != "profile_top"}))
        print(table)
        results["batches"].append(entry)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
