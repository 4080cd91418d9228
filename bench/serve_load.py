"""Serving throughput: N concurrent streams over two adapters against one stream at a time.

Builds a random-weight base of --shape (bench/common.py) and two LoRA runs on it (random
adapters, laid out as `tunelab train` writes them), serves the base and both through `tunelab
serve`'s app on 127.0.0.1 in this process, and times, through the `openai` client:
1. --streams streamed chat requests at once, alternating between the two adapters (they share
   decoding batches: `batching.Batcher` mixes LoRAs row by row);
2. --sequential streamed requests one after another, alternating too.
Every request asks for --max-tokens tokens with `ignore_eos`, so each costs the same work
whatever the weights are: random weights give garbage text and honest timings. Tokens/s is
answer tokens over wall time, HTTP and SSE included; `first_text_p50_s` is the median time to
a stream's first non-empty text (a random model that emits only whitespace or special tokens
has none until its end, which then counts).

    python bench/serve_load.py --tokenizer shared/tokenizers/qwen2 --shape qwen2-1.5b \
        --streams 64 --json bench/results/serve_load.json
    python bench/serve_load.py --tokenizer DIR --shape tiny --device cpu --streams 6   # its own test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "src"), str(BENCH)]  # runs from a checkout too

from common import SHAPES, SYSTEM, random_runs  # noqa: E402

QUESTIONS = ["你是谁？", "1.11 和 1.9 哪个大？", "Who are you?", "What is the capital of France?",
             "给我讲一个关于御花园的故事。", "Write a short poem about the sea."]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer directory with a chat template")
    p.add_argument("--shape", default="qwen2-1.5b", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams")
    p.add_argument("--sequential", type=int, default=8, help="streams answered one at a time")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens every answer has")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def build_runs(args, root: Path) -> list[str]:
    """A random base of `args.shape` under root/base and two LoRA runs on it."""
    return random_runs(args.shape, args.tokenizer, args.device, args.dtype, root,
                       {"lora-a": "lora", "lora-b": "lora"}, system_prompt=SYSTEM)


async def one_stream(client, model: str, question: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first, tokens, text = None, 0, ""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "first_text_s": (first or time.perf_counter()) - started,
            "seconds": time.perf_counter() - started}


async def timed(url: str, models: list[str], n: int, max_tokens: int, concurrent: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=3600)
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one_stream(client, m, q, max_tokens) for m, q in jobs),
                                       return_exceptions=True)
    else:
        results = []
        for m, q in jobs:
            try:
                results.append(await one_stream(client, m, q, max_tokens))
            except Exception as err:  # noqa: BLE001 - counted as a failure
                results.append(err)
    seconds = time.perf_counter() - started
    await client.close()
    done = [r for r in results if isinstance(r, dict)]
    tokens = sum(r["tokens"] for r in done)
    return {"streams": n, "failures": len(results) - len(done), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "first_text_p50_s": round(statistics.median(r["first_text_s"] for r in done), 4) if done else None,
            "per_stream_tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in done), 1)
            if done else None}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from tunelab.serve import ServerConfig, open_service, serving_in_thread

    with tempfile.TemporaryDirectory() as tmp:
        runs = build_runs(args, Path(tmp))
        server = ServerConfig(max_concurrent=max(args.streams, args.sequential), max_tokens=args.max_tokens,
                              max_prompt_tokens=512)
        service = open_service(runs, server=server)
        models = [Path(r).name for r in runs]
        device = service.batcher.engine.device
        try:
            with serving_in_thread(service) as url:
                asyncio.run(timed(url, models, 2, min(8, args.max_tokens), True))  # warm-up
                before = service.batcher.stats()
                concurrent = asyncio.run(timed(url, models, args.streams, args.max_tokens, True))
                after = service.batcher.stats()
                one = asyncio.run(timed(url, models, args.sequential, args.max_tokens, False))
        finally:
            service.batcher.close()
    report = {
        "bench": "serve_load", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "shape": args.shape, "adapters": models, "max_tokens": args.max_tokens,
        "concurrent": concurrent, "one_at_a_time": one,
        "speedup": round(concurrent["tokens_per_s"] / one["tokens_per_s"], 2) if one["tokens_per_s"] else None,
        "batcher": {"peak_rows": after["peak_rows"], "steps": after["steps"] - before["steps"],
                    "mixed_steps": after["mixed_steps"] - before["mixed_steps"]},
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    main()
