"""The learning matrix: every method crossed with every training path, on real weights.

A path that runs is not a path that learns. Each cell trains through `tunelab.train.train`
(the real path, with its invariants on) for a fixed budget, then its saved adapter is
reloaded as `chat` and `eval` load it and its held-out loss measured by one common
evaluator (`invariants.plain_loss`: each held-out row alone through PEFT's own forward).
The reference is a plain PEFT + plain PyTorch loop (padded rows, PEFT's forward, unfused
AdamW) on the same rows in the same order, run with several seeds: its seed-to-seed spread
sets the tolerance. A cell passes when its held-out loss is within that tolerance of the
reference's and below the base's.

    python bench/learning_matrix.py --model DIR --json OUT.json [--methods lora ia3 ...] [--paths default eager ...]
    python bench/learning_matrix.py --table RESULTS.json ...   # the markdown table of saved results

The model: a local HF directory (SmolLM2-135M-Instruct from `tunelab pull`, or any other);
the data: the demo persona by default. Results: one JSON, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab import train as train_module  # noqa: E402
from tunelab.config import DataConfig, MitigateConfig, ModelConfig, TrainConfig  # noqa: E402
from tunelab.data import ChatFormat, prepare  # noqa: E402
from tunelab.data.collate import pad_batch  # noqa: E402
from tunelab.data.template import IGNORE  # noqa: E402
from tunelab.invariants import plain_loss  # noqa: E402
from tunelab.methods import MethodConfig, get  # noqa: E402
from tunelab.models import load_model, load_tokenizer, resolve_device  # noqa: E402
from tunelab.runs import load_run  # noqa: E402
from tunelab.step import step_rows  # noqa: E402
from tunelab.train import lr_lambda  # noqa: E402

DEMO = ROOT / "src/tunelab/assets/demo"
# (method name, method options, learning rate): the reference recipe's lr for the LoRA family,
# the usual ones for the others.
METHODS = {
    "lora": ("lora", {}, 1e-3),
    "dora": ("lora", {"dora": True}, 1e-3),
    "rslora": ("lora", {"rslora": True}, 1e-3),
    "pissa": ("lora", {"init": "pissa"}, 1e-3),
    "qlora": ("qlora", {}, 1e-3),
    "ia3": ("ia3", {}, 1e-2),
    "ptuning": ("ptuning", {}, 1e-3),
    "prompt_tuning": ("prompt_tuning", {}, 1e-2),
    "prefix": ("prefix", {}, 1e-2),
    "freeze": ("freeze", {}, 1e-4),
    "full": ("full", {}, 1e-5),
}
# path name -> train options; `oom` and `resume` are set up by `cell` itself
PATHS = {
    "default": {},
    "eager": {"cuda_graphs": False},
    "padded": {"packing": "off"},
    "checkpointing": {"gradient_checkpointing": True},
    "compile": {"compile": True},
    "mbt512": {"micro_batch_tokens": 512},
    "bits": {"lora_dropout_kernel": "bits"},
    "oom": {"auto_micro_batch": True},
    "resume": {},
    "kl": {},                      # the mitigation cells (docs/MITIGATION.md): their options are in MITIGATE
    "kl_padded": {"packing": "off"},
    "replay_kl": {},
}
LORA_ONLY = {"bits", "compile"}
MITIGATE = {  # path -> --mitigate options. These cells pass when they learn (held-out below the base):
    # the KL term holds the model back by design, so the reference's tolerance does not apply.
    "kl": {"kl": 0.1, "kl_on": "all"},
    "kl_padded": {"kl": 0.1, "kl_on": "all"},
    "replay_kl": {"replay": 0.2, "replay_prompts": 64, "replay_max_new_tokens": 64, "kl": 0.1},
}


class _Stop(Exception):
    """Raised after the mid-run checkpoint: the process 'crashes' there."""


def applicable(method: str, path: str, device: torch.device) -> str | None:
    """Why a cell is not run, or None."""
    name = METHODS[method][0]
    caps = get(name).capabilities
    if caps.needs_gpu and device.type != "cuda":
        return "needs a GPU"
    if name == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    if path in LORA_ONLY and name != "lora":
        return "a fused-LoRA lever"
    if path in ("eager", "mbt512") and not caps.supports_packing:
        return "the method does not pack (no graphs either)"
    if path in ("eager", "compile", "bits", "oom") and device.type != "cuda":
        return "a CUDA lever"
    if MITIGATE.get(path, {}).get("kl") and caps.adapter_kind == "whole_model":
        return "KL needs the base back (adapter off); refused for methods that train the base's weights"
    return None


def configs(args, method: str, seed: int) -> tuple[ModelConfig, DataConfig, MethodConfig, TrainConfig]:
    name, options, lr = METHODS[method]
    model = ModelConfig(path=args.model, dtype=args.dtype)
    data = DataConfig(path=args.data, system_prompt=args.system_prompt, val_size=args.val_size,
                      max_length=args.max_length)
    method_cfg = MethodConfig(name=name)
    sub = getattr(method_cfg, name)
    for key, value in options.items():
        setattr(sub, key, value)
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                        lr=args.lr_scale * lr, save_every=0, seed=seed, eval_every=args.steps)
    return model, data, method_cfg, train


def held_out(net, rows, device, autocast) -> float:
    return plain_loss(net, rows, device, autocast)


def autocast_for(device, dtype):
    return (torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and dtype == torch.bfloat16 else nullcontext())


def reference(args, method: str, seed: int) -> dict:
    """Plain PEFT + plain PyTorch: padded rows, PEFT's forward, unfused AdamW, same rows and order."""
    model_cfg, data, method_cfg, cfg = configs(args, method, seed)
    tokenizer = load_tokenizer(model_cfg)
    prepared = prepare(data, ChatFormat(tokenizer))
    random.seed(seed)
    torch.manual_seed(seed)
    device = resolve_device(model_cfg.device)
    base = load_model(model_cfg, device)
    autocast = autocast_for(device, base.dtype)
    base_held_out = held_out(base, prepared.val, device, autocast) if seed == args.seeds[0] else None
    chosen = get(method_cfg.name)
    net = chosen.apply(base, getattr(method_cfg, method_cfg.name)).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.max_steps))
    steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
    losses, started = [], time.perf_counter()
    for step in range(cfg.max_steps):
        rows = step_rows(prepared.train, cfg, step, steps_per_epoch)
        supervised = sum(r.num_supervised for r in rows)
        total = 0.0
        for i in range(0, len(rows), cfg.micro_batch_size):
            batch = pad_batch(rows[i:i + cfg.micro_batch_size], tokenizer.pad_token_id)
            labels = batch.pop("labels").to(device)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with autocast:
                logits = net(**batch, use_cache=False).logits[:, -labels.shape[1]:]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE, reduction="sum") / supervised
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(total)
    seconds = time.perf_counter() - started
    return {"held_out": held_out(net, prepared.val, device, autocast), "train_loss": losses[-1],
            "seconds": round(seconds, 2), "base_held_out": base_held_out}


def cell(args, method: str, path: str, seed: int, work: Path) -> dict:
    """Train through tunelab's own path; reload the adapter as chat does; held-out loss."""
    model_cfg, data, method_cfg, cfg = configs(args, method, seed)
    options = dict(PATHS[path])
    out = work / f"{method}-{path}"
    shutil.rmtree(out, ignore_errors=True)
    restore = []
    if path == "oom":  # the third micro-batch runs out of memory once; the step is redone smaller
        real, calls = train_module.queue_step, {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced by learning_matrix)")
            return real(*a, **k)
        train_module.queue_step = flaky
        restore.append(lambda: setattr(train_module, "queue_step", real))
    cfg = TrainConfig(**{**asdict(cfg), **options})
    mitigate = MitigateConfig(**MITIGATE.get(path, {}))
    started = time.perf_counter()
    try:
        if path == "resume":  # crash right after the mid-run checkpoint, then rerun the command
            half = args.steps // 2
            cfg = TrainConfig(**{**asdict(cfg), "save_every": half})
            real_save = train_module.save_checkpoint

            def save_then_crash(run, step, *a, **k):
                real_save(run, step, *a, **k)
                if step == half:
                    raise _Stop()
            train_module.save_checkpoint = save_then_crash
            try:
                train_module.train(model_cfg, data, method_cfg, cfg, mitigate, out=str(out))
            except _Stop:
                pass
            finally:
                train_module.save_checkpoint = real_save
        root = train_module.train(model_cfg, data, method_cfg, cfg, mitigate, out=str(out))
    finally:
        for undo in restore:
            undo()
    seconds = time.perf_counter() - started
    summary = json.loads((root / "summary.json").read_text())
    device = resolve_device(model_cfg.device)
    net, tokenizer, _ = load_run(root, device)
    prepared = prepare(data, ChatFormat(tokenizer))
    value = held_out(net, prepared.val, device, autocast_for(device, next(net.parameters()).dtype))
    del net
    return {"held_out": value, "train_loss": summary["final_train_loss"], "tokens_per_s": summary["tokens_per_s"],
            "skipped_steps": summary["skipped_steps"], "checks": summary["learning_checks"],
            "micro_batch_tokens": summary["micro_batch_tokens"], "seconds": round(seconds, 2)}


def main() -> None:
    if sys.argv[1:2] == ["--table"]:  # later files' methods replace earlier ones'
        merged = {"methods": {}}
        for path in sys.argv[2:]:
            merged["methods"].update(json.loads(Path(path).read_text())["methods"])
        print(table(merged))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--data", default=str(DEMO / "persona.jsonl"))
    parser.add_argument("--system-prompt", default=(DEMO / "system_prompt.txt").read_text().strip())
    parser.add_argument("--val-size", type=float, default=24)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's lr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="reference seeds (the first: cells)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = resolve_device("auto")
    work = Path(tempfile.mkdtemp(prefix="learning-matrix-"))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "methods": {}}
    for method in args.methods:
        entry = report["methods"][method] = {"cells": {}}
        skip = applicable(method, "default", device)
        if skip:
            entry["skipped"] = skip
            print(f"{method}: skipped ({skip})", flush=True)
            continue
        try:
            refs = [reference(args, method, seed) for seed in args.seeds]
        except Exception as err:  # noqa: BLE001 - the other methods still run
            entry["skipped"] = f"reference failed: {type(err).__name__}: {str(err)[:300]}"
            print(f"{method}: {entry['skipped']}", flush=True)
            continue
        values = [r["held_out"] for r in refs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        base = refs[0]["base_held_out"]
        entry.update(reference=refs, reference_mean=statistics.mean(values), reference_spread=spread,
                     base_held_out=base, tolerance=max(3 * spread, 0.01 * values[0]))
        print(f"{method}: reference {values} (spread {spread:.4f}), base {base}", flush=True)
        for path in args.paths:
            why = applicable(method, path, device)
            if why:
                entry["cells"][path] = {"skipped": why}
                continue
            try:
                got = cell(args, method, path, args.seeds[0], work)
            except Exception as err:  # noqa: BLE001 - a failing cell is a result, not the end
                got = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            if "held_out" in got:
                learned = base is None or got["held_out"] < base
                close = abs(got["held_out"] - values[0]) <= entry["tolerance"]
                got["passed"] = bool(learned and (close or path in MITIGATE))
            entry["cells"][path] = got
            print(f"  {path}: {got}", flush=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    shutil.rmtree(work, ignore_errors=True)


def table(report: dict) -> str:
    ran = {p for e in report["methods"].values() for p, c in e.get("cells", {}).items() if "skipped" not in c}
    paths = [p for p in PATHS if p in ran]
    lines = ["| method | base | reference (spread) | " + " | ".join(paths) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in paths) + " |"]
    for method, entry in report["methods"].items():
        if "skipped" in entry:
            lines.append(f"| {method} | | skipped: {entry['skipped']} |" + " |" * len(paths))
            continue
        base = entry.get("base_held_out")
        cells = []
        for path in paths:
            got = entry["cells"].get(path)
            if got is None or "skipped" in got:
                cells.append("")
            elif "error" in got:
                cells.append("**error**")
            else:
                cells.append(f"{got['held_out']:.3f}" + ("" if got["passed"] else " **FAIL**"))
        lines.append(f"| {method} | {'' if base is None else f'{base:.3f}'} | {entry['reference_mean']:.3f} "
                     f"({entry['reference_spread']:.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
