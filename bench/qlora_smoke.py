"""QLoRA smoke test on one CUDA GPU: a random-weight Qwen2-0.5B-shaped model, a few steps.

    python bench/qlora_smoke.py                       # QLoRA, then LoRA on the bf16 base for scale
    python bench/qlora_smoke.py --steps 20 --json out.json

Exercises every GPU-only path of `tunelab.methods.qlora` that the CPU tests cannot:
quantization in `apply` (through `models.load_model`, as `tunelab train` does), training
steps, save -> load (same logits), `merge` (a plain bf16 model, logits close to the 4-bit
one) and the merged model's `save_pretrained`. Prints peak memory and tokens/s for QLoRA
and, for comparison, LoRA on the same bf16 base. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.config import ModelConfig  # noqa: E402
from tunelab.methods import count_parameters, get  # noqa: E402
from tunelab.models import load_model  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1000000.0)


def save_random_base(directory: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def loss_of(net, ids: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = net(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def logits_of(net, ids: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return net(input_ids=ids, use_cache=False).logits.float()


def run(method_name: str, base_dir: Path, ids: torch.Tensor, steps: int, warmup: int) -> dict:
    """Load the base as `tunelab train` does, apply the method, train; time and measure it."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = load_model(ModelConfig(path=str(base_dir), dtype="bf16", device="cuda"))
    method = get(method_name)
    torch.manual_seed(0)
    net = method.apply(base, method.config_cls())
    weights_gib = torch.cuda.memory_allocated() / 2**30
    load_peak_gib = torch.cuda.max_memory_allocated() / 2**30  # the bf16 base before quantization
    torch.cuda.reset_peak_memory_stats()
    trainable, total = count_parameters(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    net.train()
    losses, started = [], None
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        loss = loss_of(net, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return dict(method=method_name, net=net, trainable=trainable, total=total, losses=losses,
                weights_gib=round(weights_gib, 3), load_peak_gib=round(load_peak_gib, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                tokens_per_s=round(steps * ids.numel() / elapsed, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (bitsandbytes 4-bit kernels)")
        return 1
    import bitsandbytes

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bitsandbytes {bitsandbytes.__version__}")
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "adapter"
        save_random_base(base_dir)
        ids = torch.randint(0, QWEN2_05B["vocab_size"], (args.batch, args.length),
                            generator=torch.Generator().manual_seed(0)).cuda()  # one batch, memorized

        q = run("qlora", base_dir, ids, args.steps, args.warmup)
        net, qlora = q.pop("net"), get("qlora")
        layers = [type(m).__name__ for m in net.get_base_model().modules()]
        checks["base quantized (Linear4bit layers present)"] = "Linear4bit" in layers
        checks["loss finite and falling"] = all(map(lambda x: x == x and abs(x) < 1e4, q["losses"])) \
            and q["losses"][-1] < q["losses"][0]
        reference = logits_of(net, ids[:2])
        qlora.save(net, adapter_dir)
        del net
        torch.cuda.empty_cache()

        loaded = qlora.load(load_model(ModelConfig(path=str(base_dir), dtype="bf16", device="cuda")),
                            adapter_dir, False)
        load_diff = (logits_of(loaded, ids[:2]) - reference).abs().max().item()
        checks["save -> load: same logits (|diff| < 1e-2)"] = load_diff < 1e-2
        resumed = qlora.load(load_model(ModelConfig(path=str(base_dir), dtype="bf16", device="cuda")),
                             adapter_dir, True)
        checks["load(trainable=True): same trainable count"] = count_parameters(resumed)[0] == q["trainable"]
        del resumed
        merged = qlora.merge(loaded)
        left = [n for n, m in merged.named_modules() if hasattr(m, "lora_A") or type(m).__name__ == "Linear4bit"]
        left += [n for n, p in merged.named_parameters() if type(p).__name__ == "Params4bit"]
        merged_logits = logits_of(merged, ids[:2])
        merge_diff = (merged_logits - reference).abs().max().item()
        scale = reference.abs().max().item()
        checks["merge: no 4-bit or LoRA layer left"] = not left and not hasattr(merged, "peft_config")
        checks["merge: logits close to the 4-bit model (|diff| < 2% of max |logit|)"] = merge_diff < 0.02 * scale
        merged.save_pretrained(Path(tmp) / "merged")
        checks["merged model saves as a plain model"] = (Path(tmp) / "merged" / "config.json").is_file() and \
            "quantization_config" not in json.loads((Path(tmp) / "merged" / "config.json").read_text())
        del loaded, merged
        torch.cuda.empty_cache()

        lora = run("lora", base_dir, ids, args.steps, args.warmup)
        lora.pop("net")

    for row in (q, lora):
        print(f"{row['method']:6} trainable {row['trainable']:,} of {row['total']:,} | weights "
              f"{row['weights_gib']} GiB (load peak {row['load_peak_gib']}) | training peak {row['peak_gib']} GiB | {row['tokens_per_s']:,} tokens/s | "
              f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}")
    print(f"save->load max |logit diff| {load_diff:.2e}; merged vs 4-bit max |logit diff| {merge_diff:.3e} "
          f"(max |logit| {scale:.2f})")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(dict(qlora=q, lora=lora, load_diff=load_diff, merge_diff=merge_diff,
                                             checks=checks), indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
