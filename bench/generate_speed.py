"""Generation speed: tunelab's Engine against the reference recipe's loop, in one process.

The reference answers one prompt per `model.generate` call. The Engine renders the same
prompts through the chat template, sorts them by length, left-pads them into batches and
decodes each batch with a KV cache. Both decode greedily, and both ignore the end of turn
(min_new_tokens = max_new_tokens), so every prompt costs both paths the same tokens whatever
the weights are: random weights give garbage text and honest timings.

The one-at-a-time loop is slow (a Qwen2-1.5B-shaped model on one GPU makes tens of tokens a
second), so by default it answers only the first --reference-prompts prompts; rates are per
prompt and per token, so the two remain comparable. Greedy token ids of that subset are
compared: in fp32 they are identical; in bf16 a batched matmul rounds differently from an
unbatched one, a near-tie flips and the two answers part ways from there, so the match rate
is reported (whole answers equal, and the mean share of tokens before the first difference).

    python bench/generate_speed.py --data shared/data/huanhuan.json \
        --tokenizer shared/tokenizers/qwen2 --random-weights qwen2-1.5b
    python bench/generate_speed.py ... --random-weights tiny --device cpu   # the script's own test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "src"), str(BENCH)]  # runs from a checkout too

from common import SHAPES, SYSTEM, build_model, sync  # noqa: E402
from tunelab.config import GenerationConfig  # noqa: E402
from tunelab.generate import Engine  # noqa: E402

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="JSON list of instructions (strings or alpaca rows)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory with a chat template")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--random-weights", choices=sorted(SHAPES), help="a random model of this shape")
    source.add_argument("--model", help="a real model directory instead")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    p.add_argument("--prompts", type=int, default=256, help="prompts the Engine answers")
    p.add_argument("--reference-prompts", type=int, default=32,
                   help="prompts the one-at-a-time loop answers (the first N; 0: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--system", default=SYSTEM, help="system prompt of every conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", nargs="+", default=["auto"], choices=["auto", "static", "dynamic"],
                   help="Engine decoding paths to time, the first compared with the reference: static "
                        "(fixed buffers, CUDA graphs on a GPU), dynamic (growing cache, finished rows leave), "
                        "auto (the Engine's default: static on a GPU)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def load_conversations(path: str, n: int, system: str) -> list[list[dict]]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    users = [r if isinstance(r, str) else r["instruction"] + (r.get("input") or "") for r in rows]
    users = (users * (n // len(users) + 1))[:n]  # repeat a short file
    return [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": u}]
            for u in users]


def load_model(args, tokenizer, device: torch.device, dtype: torch.dtype):
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    model = build_model(args.random_weights, device, dtype, vocab_size=len(tokenizer), seed=args.seed)
    model.config.use_cache = model.generation_config.use_cache = True  # built for training
    return model.eval()


def reference_loop(model, engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference recipe: one unpadded prompt per generate call (greedy, same stop set)."""
    answers = []
    for ids in prompts:
        batch = torch.tensor([ids], device=engine.device)
        with torch.no_grad():
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 eos_token_id=engine.stop_ids, pad_token_id=engine.tokenizer.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        answers.append(out[0, batch.shape[1]:].tolist())
    return answers


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def compare(engine_answers: list[list[int]], reference: list[list[int]]) -> dict:
    exact, shared = 0, []
    for a, b in zip(engine_answers, reference):
        exact += a == b
        first_difference = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shared.append(first_difference / max(len(b), 1))
    return {"compared": len(reference), "exact": exact, "exact_rate": exact / max(len(reference), 1),
            "mean_shared_prefix": sum(shared) / max(len(shared), 1)}


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args, tokenizer, device, dtype)
    engine = Engine(model, tokenizer, device)
    prompts = [engine.format.prompt_ids(m) for m in load_conversations(args.data, args.prompts, args.system)]
    n_reference = len(prompts) if args.reference_prompts <= 0 else min(args.reference_prompts, len(prompts))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)

    default_static = engine.static
    runs = []
    for mode in args.decode:
        engine.static = default_static if mode == "auto" else mode == "static"
        # warm up (kernels, allocator; graphs are captured on a buffer's first use) before timing
        engine.complete(prompts[:args.batch_size], GenerationConfig(max_new_tokens=4), args.batch_size,
                        ignore_eos=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        answered, seconds = timed(lambda: engine.complete(prompts, gen, args.batch_size, ignore_eos=True), device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        runs.append((mode if mode != "auto" else ("static" if engine.static else "dynamic"), answered, seconds, peak))
    _, answers, engine_s, engine_peak = runs[0]
    reference_loop(model, engine, prompts[:2], 4)
    reference, reference_s = timed(lambda: reference_loop(model, engine, prompts[:n_reference],
                                                          args.max_new_tokens), device)

    def rates(n_prompts: int, answered: list[list[int]], seconds: float) -> dict:
        tokens = sum(len(a) for a in answered)
        return {"prompts": n_prompts, "new_tokens": tokens, "seconds": round(seconds, 3),
                "prompts_per_s": round(n_prompts / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}

    result = {
        "engine": {**rates(len(prompts), answers, engine_s), "batch_size": args.batch_size, "decode": runs[0][0],
                   "peak_memory_gib": round(engine_peak, 2) if engine_peak else None},
        "engines": [{**rates(len(prompts), a, sec), "decode": mode, "batch_size": args.batch_size,
                     "peak_memory_gib": round(peak, 2) if peak else None} for mode, a, sec, peak in runs],
        "reference": rates(n_reference, reference, reference_s),
        "match": compare(answers[:n_reference], reference),
        "setup": {"model": args.model or f"random {args.random_weights}", "dtype": str(dtype).removeprefix("torch."),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  "max_new_tokens": args.max_new_tokens, "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
                  "torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    result["speedup"] = round(result["engine"]["tokens_per_s"] / result["reference"]["tokens_per_s"], 2)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def print_table(r: dict) -> None:
    s = r["setup"]
    print(f"\n{s['model']} ({s['dtype']}) on {s['device']}; {s['max_new_tokens']} new tokens a prompt "
          f"(end of turn ignored), prompts {s['mean_prompt_tokens']} tokens on average")
    print("| path | prompts | new tokens | seconds | prompts/s | tokens/s | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ref, eng = r["reference"], r["engine"]
    print(f"| one prompt per generate() | {ref['prompts']} | {ref['new_tokens']} | {ref['seconds']} | "
          f"{ref['prompts_per_s']} | {ref['tokens_per_s']} | 1.00 |")
    for eng in r["engines"]:
        print(f"| Engine ({eng['decode']}), batch {eng['batch_size']} | {eng['prompts']} | {eng['new_tokens']} | "
              f"{eng['seconds']} | {eng['prompts_per_s']} | {eng['tokens_per_s']} | "
              f"{eng['tokens_per_s'] / ref['tokens_per_s']:.2f} |")
    m = r["match"]
    print(f"greedy ids, Engine vs one at a time, first {m['compared']} prompts: {m['exact']} identical "
          f"({100 * m['exact_rate']:.0f}%); on average {100 * m['mean_shared_prefix']:.0f}% of each answer "
          f"before the first difference")


if __name__ == "__main__":
    main()
