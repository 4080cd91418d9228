"""Does the fast path learn what the padded path learns?

Two checks:

    # CPU, real weights (SmolLM2-135M-Instruct): held-out loss after the same rows and steps,
    # padded vs packed, 3 seeds; plus per-token loss of one batch, both ways.
    python bench/learning_parity.py learn --model SmolLM2-135M-Instruct.Q4_1.gguf --data huanhuan.json

    # GPU, random-weight Qwen2 shape in bf16: per-token loss and hidden state of one fixed
    # batch, padded vs fast, each against an fp32 padded truth; a deliberately leaky variant
    # (packed, causal over the whole sequence) shows the check catches cross-row attention.
    python bench/learning_parity.py tokens --tokenizer qwen2/ --data huanhuan.json --shape qwen2-1.5b

A leak shows on single tokens of the later rows of a pack, so every comparison is per token
(max over tokens), never only the mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import SYSTEM, build_model  # noqa: E402

CPU = torch.device("cpu")


def per_token_losses(net, rows, fast_or_plan, device, autocast, packed: bool, pad_id: int,
                     leak: bool = False) -> torch.Tensor:
    """Per-token loss of `rows` in one micro-batch, in row order (packed or padded)."""
    from tunelab.accel.loss import LossPlan, token_loss_sum
    from tunelab.data.packing import packed_inputs, padded_inputs

    plan = fast_or_plan if isinstance(fast_or_plan, LossPlan) else fast_or_plan.loss
    batch = packed_inputs(rows) if packed else padded_inputs(rows, pad_id)
    if leak:  # row boundaries withheld: causal attention over the whole pack
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(key)
    with torch.no_grad():
        return token_loss_sum(net, batch, plan, device, autocast, reduction="none").float().cpu()


def token_hidden(net, rows, device, autocast, packed: bool, pad_id: int, leak: bool = False) -> torch.Tensor:
    """Final hidden state of every real token, [tokens, hidden], row order."""
    from tunelab.accel.loss import model_parts
    from tunelab.data.packing import packed_inputs, padded_inputs

    trunk, _ = model_parts(net)
    batch = packed_inputs(rows) if packed else padded_inputs(rows, pad_id)
    batch.pop("labels")
    if leak:
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(key)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad(), autocast:
        hidden = trunk(**batch, use_cache=False).last_hidden_state.float()
    if packed:
        return hidden[0].cpu()
    mask = batch["attention_mask"].bool()
    return hidden[mask].cpu()


def compare(candidate: torch.Tensor, truth: torch.Tensor) -> dict:
    diff = (candidate - truth).abs()
    return {"max": diff.max().item(), "mean": diff.mean().item()}


def compare_hidden(candidate: torch.Tensor, truth: torch.Tensor) -> dict:
    rel = (candidate - truth).norm(dim=-1) / truth.norm(dim=-1).clamp_min(1e-6)
    return {"max_rel": rel.max().item(), "mean_rel": rel.mean().item()}


# -- GPU: per-token parity on one batch --------------------------------------------------------

def tokens_check(args) -> dict:
    from transformers import AutoTokenizer

    from common import tunelab_rows
    from tunelab import accel
    from tunelab.methods import get

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = tunelab_rows(args.data, tokenizer)[:args.rows]
    shape = "tiny" if device.type == "cpu" else args.shape
    pad = tokenizer.pad_token_id
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape,
               "rows": len(rows), "tokens": sum(len(r.input_ids) for r in rows),
               "supervised": sum(r.num_supervised for r in rows)}

    def model(dtype, attn="sdpa"):
        base = build_model(shape, device, dtype, vocab_size=len(tokenizer), attn_implementation=attn)
        net = get("lora").apply(base, get("lora").config_cls())
        with torch.no_grad():  # a non-zero adapter, same on every copy (seeded)
            g = torch.Generator(device=device).manual_seed(1)
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
        return net.eval()

    fp32 = model(torch.float32)
    plan32 = accel.loss.plan_loss(fp32, device, nullcontext())
    truth_loss = per_token_losses(fp32, rows, plan32, device, nullcontext(), False, pad)
    truth_hidden = token_hidden(fp32, rows, device, nullcontext(), False, pad)
    del fp32
    torch.cuda.empty_cache() if device.type == "cuda" else None

    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    net = model(low)
    plan = accel.loss.plan_loss(net, device, autocast)
    results["padded_sdpa"] = {**compare(per_token_losses(net, rows, plan, device, autocast, False, pad), truth_loss),
                              **compare_hidden(token_hidden(net, rows, device, autocast, False, pad), truth_hidden)}
    # transformers' own handling of a packed batch under SDPA, with and without a cache object
    for use_cache in (False, True):
        from tunelab.data.packing import packed_inputs

        batch = packed_inputs(rows)
        labels = batch.pop("labels")
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        with torch.no_grad(), autocast:
            logits = net(input_ids=ids, position_ids=positions, use_cache=use_cache).logits.float()
        keep = labels[0] != -100
        losses = torch.nn.functional.cross_entropy(logits[0][keep.to(device)], labels[0][keep].to(device),
                                                   reduction="none").cpu()
        results[f"packed_sdpa_use_cache_{use_cache}"] = compare(losses, truth_loss)
    fast = accel.setup(net, "on", True, device, autocast, pad)
    results["padded_varlen"] = {**compare(per_token_losses(net, rows, fast, device, autocast, False, pad), truth_loss)}
    results["leaky_pack"] = {**compare(per_token_losses(net, rows, fast, device, autocast, True, pad, leak=True),
                                       truth_loss),
                             **compare_hidden(token_hidden(net, rows, device, autocast, True, pad, leak=True),
                                              truth_hidden)}
    from tunelab.accel import liger

    with liger.liger(net.get_base_model(), "auto", device) as liger_on:  # the defaults, liger if installed
        results["fast_path"] = {
            "packed": fast.packed, "varlen": fast.varlen, "fused_loss": fast.loss.trunk is not None,
            "kernel": "flash varlen" if accel.attention.varlen_available(device, low) else "per-row SDPA",
            "liger": liger_on,
            **compare(per_token_losses(net, rows, fast, device, autocast, True, pad), truth_loss),
            **compare_hidden(token_hidden(net, rows, device, autocast, True, pad), truth_hidden)}
    if fast.graphs is not None:  # the CUDA-graph replay of the same batch: loss and gradients
        results["graph_vs_eager"] = graph_check(net, rows, fast, device, autocast)
    # bf16 tolerance: the fast path may be off the fp32 truth by at most twice what the
    # padded bf16 path is (plus one bf16 step of a ~12-nat loss), token by token
    tolerance = 2 * results["padded_sdpa"]["max"] + 12 * 2**-8
    results["tolerance"] = tolerance
    results["fast_within_tolerance"] = results["fast_path"]["max"] <= tolerance
    results["leak_caught"] = (results["leaky_pack"]["max"] > tolerance
                              or results["leaky_pack"]["max_rel"] > 4 * results["padded_sdpa"]["max_rel"])
    return results


def graph_check(net, rows, fast, device, autocast) -> dict:
    """Loss and gradients of one packed batch, eager vs CUDA-graph replay (dropout off)."""
    from tunelab.accel.loss import token_loss_sum
    from tunelab.data.packing import packed_inputs

    params = fast.graphs.params
    batch = packed_inputs(rows)
    net.eval()
    eager = token_loss_sum(net, batch, fast.loss, device, autocast)
    eager_grads = torch.autograd.grad(eager, params)
    for p in params:
        p.grad = None
    graphed = fast.graphs.run(batch, 1.0)
    if graphed is None:
        return {"failed": fast.graphs.failed}
    graphed = fast.graphs.run(batch, 1.0)  # a second replay, into accumulated grads: 2x
    rel = max(((p.grad / 2 - g).norm() / g.norm().clamp_min(1e-12)).item()
              for p, g in zip(params, eager_grads) if g.norm() > 0)
    for p in params:
        p.grad = None
    return {"loss_eager": eager.item(), "loss_graph": graphed.item(),
            "loss_rel_diff": abs(graphed.item() - eager.item()) / abs(eager.item()),
            "max_grad_rel_diff": rel, "graphs": len(fast.graphs.graphs)}


# -- CPU: held-out loss after training, 3 seeds -------------------------------------------------

def learn(args) -> dict:
    from tunelab import accel
    from tunelab.config import DataConfig, ModelConfig, TrainConfig
    from tunelab.data import ChatFormat, load_examples, render_all
    from tunelab.methods import get
    from tunelab.models import load_model, load_tokenizer
    from tunelab.step import evaluate_loss, optimizer_step, step_rows
    from tunelab.train import lr_lambda

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model_cfg = ModelConfig(path=args.model, dtype="fp32", device="cpu")
    tokenizer = load_tokenizer(model_cfg)
    base = load_model(model_cfg, CPU)
    pristine = copy.deepcopy(base.state_dict())
    fmt = ChatFormat(tokenizer)
    examples = load_examples(args.data, SYSTEM).examples
    rows, _, _ = render_all(examples, fmt, DataConfig(path=args.data, max_length=args.max_length,
                                                      truncation="drop"))
    train_rows, val_rows = rows[:args.train_rows], rows[args.train_rows:args.train_rows + args.val_rows]
    pad = tokenizer.pad_token_id
    report = {"model": args.model, "train_rows": len(train_rows), "val_rows": len(val_rows),
              "train_tokens": sum(len(r.input_ids) for r in train_rows), "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "runs": []}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)

    # per-token parity on real weights, one batch of held-out rows
    net = get("lora").apply(base, get("lora").config_cls()).eval()
    padded_plan = accel.loss.plan_loss(net, CPU, nullcontext())
    batch_rows = val_rows[:args.parity_rows]
    padded = per_token_losses(net, batch_rows, padded_plan, CPU, nullcontext(), False, pad)
    fast = accel.setup(net, "on", True, CPU, nullcontext(), pad)
    report["per_token"] = {
        "tokens": padded.numel(),
        "fast_vs_padded": compare(per_token_losses(net, batch_rows, fast, CPU, nullcontext(), True, pad), padded),
        "leaky_vs_padded": compare(per_token_losses(net, batch_rows, fast, CPU, nullcontext(), True, pad,
                                                    leak=True), padded)}
    print(json.dumps(report["per_token"]), flush=True)
    net = net.unload()

    for seed in args.seeds:
        for packing in ("off", "on"):
            base.load_state_dict(pristine)
            cfg = TrainConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                              packing=packing, seed=seed, warmup_ratio=0.0, schedule="constant",
                              micro_batch_tokens=args.micro_batch_size * args.max_length)
            torch.manual_seed(seed)
            net = get("lora").apply(base, get("lora").config_cls())
            net.train()
            params = [p for p in net.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, args.steps))
            fast = accel.setup(net, packing, True, CPU, nullcontext(), pad)
            before = evaluate_loss(net, val_rows, cfg, fast, CPU, nullcontext())
            net.train()
            steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
            started, tokens, losses = time.perf_counter(), 0, []
            for step in range(args.steps):
                step_of = step_rows(train_rows, cfg, step, steps_per_epoch)
                loss, n, _ = optimizer_step(net, step_of, cfg, fast, CPU, nullcontext(), params)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                tokens += n
                losses.append(loss)
            seconds = time.perf_counter() - started
            after = evaluate_loss(net, val_rows, cfg, fast, CPU, nullcontext())
            run = {"seed": seed, "packing": packing, "val_loss_before": before, "val_loss_after": after,
                   "train_losses": losses, "tokens": tokens, "tokens_per_s": tokens / seconds}
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            net = net.unload()

    summary = {}
    for packing in ("off", "on"):
        after = [r["val_loss_after"] for r in report["runs"] if r["packing"] == packing]
        summary[packing] = {"mean": statistics.mean(after), "stdev": statistics.stdev(after) if len(after) > 1 else 0,
                            "values": after}
    diffs = [on["val_loss_after"] - off["val_loss_after"]
             for off, on in zip(report["runs"][0::2], report["runs"][1::2])]
    summary["paired_diff_on_minus_off"] = diffs
    summary["seed_spread"] = max(summary["off"]["values"]) - min(summary["off"]["values"])
    summary["no_worse"] = statistics.mean(diffs) <= max(summary["seed_spread"], 1e-3)
    report["summary"] = summary
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    lp = sub.add_parser("learn", help="CPU: held-out loss after training, padded vs packed, several seeds")
    lp.add_argument("--model", required=True, help="SmolLM2-135M-Instruct (HF dir or .gguf)")
    lp.add_argument("--data", required=True)
    lp.add_argument("--train-rows", type=int, default=96)
    lp.add_argument("--val-rows", type=int, default=48)
    lp.add_argument("--parity-rows", type=int, default=12)
    lp.add_argument("--max-length", type=int, default=160)
    lp.add_argument("--batch-size", type=int, default=8)
    lp.add_argument("--micro-batch-size", type=int, default=4)
    lp.add_argument("--steps", type=int, default=12)
    lp.add_argument("--lr", type=float, default=1e-3)
    lp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lp.add_argument("--threads", type=int)
    tp = sub.add_parser("tokens", help="per-token parity of one batch (GPU: bf16 against fp32)")
    tp.add_argument("--tokenizer", required=True)
    tp.add_argument("--data", required=True)
    tp.add_argument("--shape", default="qwen2-1.5b")
    tp.add_argument("--rows", type=int, default=16)
    tp.add_argument("--cpu", action="store_true")
    for p in (lp, tp):
        p.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = learn(args) if args.mode == "learn" else tokens_check(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return report


if __name__ == "__main__":
    main()
