"""One training loop for every method: setup -> fit -> save, top to bottom.

The loss is the mean over every supervised token of an optimizer step (not the mean of
micro-batch means), so gradient accumulation and micro-batch size do not change what is
learned. Before each optimizer step the gradients themselves are checked: a non-finite
step is skipped and counted, and too many in a row stop the run with the last good
checkpoint intact.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from .config import DataConfig, ModelConfig, TrainConfig, to_dict
from .data import ChatFormat, Rendered, prepare
from .data.collate import pad_batch, shift_labels
from .methods import MethodConfig, count_parameters, selected
from .models import load_model, load_tokenizer, resolve_device
from .runs import (RunDir, assert_finite, load_trainer_state, save_checkpoint, set_rng_state,
                   write_atomically, write_json)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had non-finite loss or gradients."""


class Interrupted(RuntimeError):
    """SIGTERM / Ctrl-C: a checkpoint was saved; the message says how to resume."""


def train(model: ModelConfig, data: DataConfig, method: MethodConfig = MethodConfig(),
          train: TrainConfig = TrainConfig(), out: str = "runs/run", resume: bool = True) -> Path:
    """Fine-tune `model` on `data` with `method`; write a self-describing run directory.

    Args:
        model: the base model.
        data: the training data and how it is rendered.
        method: the fine-tuning method and its options.
        train: optimisation, checkpointing and logging.
        out: the run directory.
        resume: continue from the newest complete checkpoint in `out`, if any.
    """
    method_cfg, cfg = method, train
    run = RunDir(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    config = {"model": to_dict(model), "data": to_dict(data), "method": to_dict(method_cfg),
              "train": to_dict(cfg), "out": str(out)}

    # -- setup: data first (fails fast), then the model -----------------------------------
    tokenizer = load_tokenizer(model)
    fmt = ChatFormat(tokenizer)
    prepared = prepare(data, fmt)
    run.config.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    write_json(run.data_stats, prepared.stats)
    tokenizer.save_pretrained(run.tokenizer)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(model.device)
    base = load_model(model, device)
    the_method, options = selected(method_cfg)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "tokens": 0, "elapsed": 0.0}
    checkpoints = run.complete_checkpoints() if resume else []
    latest = checkpoints[-1] if checkpoints else None
    net = the_method.load(base, latest / "adapter", True) if latest else the_method.apply(base, options)
    net.train()
    trainable, total = count_parameters(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and base.dtype == torch.bfloat16 else nullcontext())
    if latest:
        saved = load_trainer_state(latest)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state.update(json.loads((latest / "state.json").read_text()))
        print(f"resuming from {latest} (step {state['step']} of {total_steps})")

    print(f"{the_method.name}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.3f}%); {len(prepared.train)} train rows, "
          f"{len(prepared.val)} held-out; {total_steps} optimizer steps on {device}")

    # -- fit ----------------------------------------------------------------------------
    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    metrics = open(run.metrics, "a", encoding="utf-8")
    writer = tensorboard_writer(run) if cfg.tensorboard else None
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {the_method.name}",
               dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter() - state["elapsed"]
    try:
        while state["step"] < total_steps:
            step = state["step"]
            rows = step_rows(prepared.train, cfg, step, steps_per_epoch)
            loss, n_tokens, grad_norm = optimizer_step(net, rows, cfg, tokenizer.pad_token_id,
                                                       device, autocast, params)
            if math.isfinite(loss) and math.isfinite(grad_norm):
                optimizer.step()
                state["bad_in_row"] = 0
            else:  # the update would poison the weights: skip it, keep count
                state["skipped_steps"] += 1
                state["bad_in_row"] += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] = step + 1
            state["tokens"] += n_tokens
            state["elapsed"] = time.perf_counter() - started
            bar.update(1)
            record = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 3),
                      "loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                      "tokens": state["tokens"], "tokens_per_s": state["tokens"] / state["elapsed"],
                      "skipped_steps": state["skipped_steps"]}
            if state["bad_in_row"] >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{state['bad_in_row']} optimizer steps in a row had non-finite loss or "
                    f"gradients (last at step {state['step']}); the last good checkpoint is in "
                    f"{run.checkpoints}. Lower --train.lr, or try --model.dtype fp32")
            end_of_epoch = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
            if prepared.val and (end_of_epoch if cfg.eval_every == 0 else state["step"] % cfg.eval_every == 0
                                 or state["step"] == total_steps):
                record["val_loss"] = evaluate_loss(net, prepared.val, cfg, tokenizer.pad_token_id,
                                                   device, autocast)
                net.train()
            if state["step"] % cfg.log_every == 0 or "val_loss" in record or state["step"] == total_steps:
                log(metrics, writer, record)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            save_now = cfg.save_every and state["step"] % cfg.save_every == 0
            if save_now or stop["signal"]:
                save_checkpoint(run, state["step"], net, the_method, optimizer, scheduler, state,
                                cfg.keep_checkpoints)
            if stop["signal"]:
                raise Interrupted(f"stopped by signal {stop['signal']} after step {state['step']}; "
                                  f"checkpoint saved. Resume with: tunelab train --config {run.config}")
    finally:
        bar.close()
        metrics.close()
        if writer:
            writer.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)

    # -- save -----------------------------------------------------------------------------
    assert_finite(net, "the adapter")
    write_atomically(run.adapter, lambda tmp: the_method.save(net, tmp))
    summary = {
        "method": the_method.name, "trainable_params": trainable, "total_params": total,
        "steps": state["step"], "skipped_steps": state["skipped_steps"], "tokens": state["tokens"],
        "wall_time_s": round(state["elapsed"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9), 1),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                            if device.type == "cuda" else None),
        "final_train_loss": record.get("loss"), "final_val_loss": record.get("val_loss"),
        "device": str(device),
    }
    write_json(run.summary, summary)
    run.done.write_text("ok\n")
    print(f"done: {run.root} ({summary['wall_time_s']} s, {summary['tokens_per_s']} tokens/s)")
    return run.root


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def step_rows(rows: list[Rendered], cfg: TrainConfig, step: int, steps_per_epoch: int) -> list[Rendered]:
    """Rows of optimizer step `step`: a fixed permutation per epoch, so a resumed run sees
    exactly the rows an uninterrupted one would."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    return [rows[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]


def micro_batches(rows: list[Rendered], size: int) -> list[list[Rendered]]:
    # Sorting by length inside one optimizer step cuts padding without changing the step's
    # gradient: the step still sums over the same rows.
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def token_loss_sum(net, batch: dict, device, autocast) -> torch.Tensor:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = shift_labels(batch.pop("labels"))
    with autocast:
        logits = net(**batch, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def optimizer_step(net, rows, cfg, pad_id, device, autocast, params) -> tuple[float, int, float]:
    """Forward/backward every micro-batch of one step; (mean loss, tokens, grad norm)."""
    supervised = sum(r.num_supervised for r in rows)
    tokens = sum(len(r.input_ids) for r in rows)
    total = 0.0
    for chunk in micro_batches(rows, cfg.micro_batch_size):
        loss = token_loss_sum(net, pad_batch(chunk, pad_id), device, autocast) / supervised
        loss.backward()
        total += loss.item()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return total, tokens, grad_norm


@torch.no_grad()
def evaluate_loss(net, rows: list[Rendered], cfg: TrainConfig, pad_id: int, device, autocast) -> float:
    """Mean loss per supervised token over `rows`."""
    net.eval()
    total, count = 0.0, 0
    for chunk in micro_batches(rows, cfg.micro_batch_size):
        total += token_loss_sum(net, pad_batch(chunk, pad_id), device, autocast).item()
        count += sum(r.num_supervised for r in chunk)
    return total / max(count, 1)


def log(stream, writer, record: dict) -> None:
    stream.write(json.dumps(record) + "\n")
    stream.flush()
    if writer:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["step"])


def tensorboard_writer(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--train.tensorboard needs the tensorboard package: "
                           "pip install 'tunelab[tensorboard]'") from None
    return SummaryWriter(str(run.root / "tensorboard"))
