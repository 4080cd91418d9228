"""tunelab's own training step, timed: the functions `tunelab.train.train` runs, on a
random-weight model built in memory (same setup order: checkpointing, method, optimizer,
autocast, accel.prepare)."""

from __future__ import annotations

import gc
import math
import time
from functools import partial
from pathlib import Path
from contextlib import nullcontext

import torch

from common import Clock, build_model, fresh_memory, parameter_count, peak_gib


def apply_method(name: str, base):
    """(capabilities.supports_packing, trainable model) of tunelab's method `name`.

    P-Tuning is built with PEFT from the reference settings when tunelab has not registered
    it (it cannot pack: each row carries its own virtual tokens)."""
    from tunelab.methods import METHODS

    if name in METHODS:
        method = METHODS[name]
        return method.capabilities.supports_packing, method.apply(base, method.config_cls())
    if name == "ptuning":
        from reference import peft_model

        return False, peft_model(base, "ptuning", gradient_checkpointing=False)
    raise ValueError(f"unknown method {name!r}")


def profile_steps(path: str, steps, count: int) -> None:
    """Kernel-level profile of a few optimizer steps run as the timed loop runs them
    (`steps()`, `count` of them, the loss read one step late): the top kernels by GPU time, how many kernels
    a step launches, GPU busy time against the span of the kernels, and the idle gaps
    between kernels (the largest, with the kernels on either side), written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        wall = time.perf_counter()
        steps()
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy = sum(e.device_time for e in kernels) / 1e6
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e6 if kernels else 0.0
    gaps, end, before = [], None, None
    for e in kernels:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, before, e.name))
        if end is None or e.time_range.end > end:
            end, before = e.time_range.end, e.name
    idle = sum(g for g, _, _ in gaps) / 1e6
    small = sum(g for g, _, _ in gaps if g < 5) / 1e6
    summary = (f"{count} steps, wall {wall:.3f} s (profiled), {len(kernels) / count:,.0f} kernels a step, "
               f"GPU busy {busy:.3f} s ({100 * busy / wall:.0f}% of wall), kernel span {span:.3f} s, "
               f"idle between kernels {idle:.4f} s ({1e3 * idle / count:.2f} ms a step; gaps under 5 us "
               f"{1e3 * small / count:.2f} ms a step), mean kernel {1e6 * busy / max(len(kernels), 1):.1f} us\n")
    summary += "largest gaps (us, kernel before -> kernel after):\n" + "".join(
        f"  {g:9.1f}  {a[:60]} -> {b[:60]}\n" for g, a, b in sorted(gaps, reverse=True)[:25])
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=80, max_name_column_width=70)
    # operators with their input shapes (eager steps; a graph replay's kernels name no operator)
    table += "\n" + prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=160, max_name_column_width=40, max_shapes_column_width=80)
    launched: dict = {}  # (operator, its input shapes, kernel) -> GPU us (eager steps only)
    for e in prof.events():
        for kernel in getattr(e, "kernels", []):
            key = (e.name, str(e.input_shapes)[:90], kernel.name[:50])
            launched[key] = launched.get(key, 0.0) + kernel.duration
    if launched:
        table += "\nkernels by the operator that launched them (us a step, operator, input shapes, kernel):\n" + "".join(
            f"  {us / count:9.1f}  {op[:40]}  {shapes}  {name}\n"
            for (op, shapes, name), us in sorted(launched.items(), key=lambda kv: -kv[1])[:120])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(summary + table)
    print(summary, flush=True)


def run_steps(indices, rows, cfg, steps_per_epoch, net, fast, device, autocast, params, optimizer, world=None):
    """(tokens, last loss, seconds the host waited for the GPU) of these optimizer steps, as
    train() runs them: a step's loss is read after the next step is queued. `world`: this
    process's `distributed.World` under torchrun (bench/scaling.py); None: one process."""
    from tunelab.distributed import SINGLE
    from tunelab.step import Readback, apply_update, queue_step, step_rows

    tokens, pending, loss, waited = 0, None, float("nan"), 0.0
    for step in indices:
        values, n_tokens = queue_step(net, step_rows(rows, cfg, step, steps_per_epoch), cfg, fast, device,
                                      autocast, params, world or SINGLE)
        readback = Readback(values)
        apply_update(optimizer, values)
        optimizer.zero_grad(set_to_none=True)
        tokens += n_tokens
        if pending is not None:
            started = time.perf_counter()
            loss = pending.tolist()[0]
            waited += time.perf_counter() - started
        pending = readback
    if pending is not None:
        loss = pending.tolist()[0]
    return tokens, loss, waited


def run(shape: str, method: str, rows, tokenizer, device: torch.device, dtype: torch.dtype, steps: int,
        warmup: int, train_cfg, fuse_lora: bool | str = True, ce_kernel: bool = True,
        lora_triton: bool = True, lora_fused_dropout: bool = False, fast_norm: bool = True,
        flash_gqa: bool = True, gc_freeze: bool = False, fold_ratio: float = 4, profile: str | None = None) -> dict:
    """`fuse_lora`: True (tunelab's fused LoRA, projections that share an input computed as
    one group, B folded into wide groups' base matmul), "unfolded" (no folding), "alone"
    (each projection alone), False (PEFT's forward); `ce_kernel`:
    the Triton cross-entropy kernel (False: the torch path); `lora_triton`: fused LoRA's
    Triton dropout kernels (False: torch ops); `lora_fused_dropout`: their mask-bits pair;
    `fast_norm`: tunelab's RMSNorm kernels for frozen norms (False: liger's); `flash_gqa`:
    grouped-query attention in FlashAttention's kernels (False: keys and values repeated);
    `fold_ratio`: `accel.lora.FOLD_RATIO` for this run; `gc_freeze`: Python's garbage collector told to skip every object made before training.
    The result has the host's busy time a step of the timed pass (`host_ms_per_step`) and
    its wait for the GPU (`wait_ms_per_step`): a host that never waits sets the speed."""
    from tunelab import accel
    from tunelab.accel import Levers, plain_forward
    from tunelab.invariants import plain_loss, tolerance
    from tunelab.step import evaluate_loss, step_rows

    cfg = train_cfg
    levers = Levers.from_train(cfg, fuse_lora=fuse_lora, fold_ratio=fold_ratio, triton_cross_entropy=ce_kernel,
                               triton_lora_dropout=lora_triton, triton_rms_norm=fast_norm, flash_gqa=flash_gqa,
                               lora_dropout_kernel="bits" if lora_fused_dropout else "copies")
    clock = Clock(device)
    with fresh_memory(device):
        base = build_model(shape, device, dtype, vocab_size=len(tokenizer))
        n_params = parameter_count(base)

        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        supports_packing, net = apply_method(method, base)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=device.type in ("cuda", "cpu"))
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if device.type == "cuda" and dtype == torch.bfloat16 else nullcontext())
        steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
        # as train() does, for the loop: every lever entered at once, the model restored after
        with accel.prepare(net, supports_packing, device, autocast, tokenizer.pad_token_id, levers) as fast:
            liger_on = fast.liger
            # Warm up on `warmup` steps, then pass once over the measured steps (CUDA graphs are
            # captured there, once per padded size, as they would be early in a run), then time
            # a second pass over the same steps: the steady state of a long run.
            measured = list(range(warmup, warmup + steps))

            # The learning check of this very run: a fixed batch (the first measured step's rows)
            # before and after, through the training path and through plain PEFT at the end.
            probe = step_rows(rows, cfg, warmup, steps_per_epoch)[:8]
            probe_before = evaluate_loss(net, probe, cfg, fast, device, autocast)
            net.train()
            loop = partial(run_steps, rows=rows, cfg=cfg, steps_per_epoch=steps_per_epoch, net=net, fast=fast,
                           device=device, autocast=autocast, params=params, optimizer=optimizer)
            first_pass = Clock(device)
            loop(range(warmup))
            first_pass.begin()
            loop(measured)
            first_pass.end()
            if gc_freeze:
                gc.collect()
                gc.freeze()
            clock.begin()
            tokens, loss, waited = loop(measured)
            clock.end()
            if gc_freeze:
                gc.unfreeze()
            peak = peak_gib(device)
            probe_after = evaluate_loss(net, probe, cfg, fast, device, autocast)
            with plain_forward(net, fast):
                probe_plain = plain_loss(net, probe, device, autocast)
            net.train()
            learning = {"probe_loss_before": probe_before, "probe_loss_after": probe_after,
                        "probe_loss_plain_peft": probe_plain,
                        "learns": bool(probe_after < probe_before - 0.01
                                       and abs(probe_after - probe_plain) <= tolerance(dtype, probe_plain))}
            if profile:
                profile_steps(profile, partial(loop, measured[:5]), 5)
        forwards = sum(len(fast.micro_batches(step_rows(rows, cfg, step, steps_per_epoch), cfg.micro_batch_size,
                                              cfg.micro_batch_tokens)) for step in range(warmup, warmup + steps))
        result = {"tokens": tokens, "seconds": clock.seconds, "tokens_per_s": tokens / clock.seconds,
                  "first_pass_seconds": first_pass.seconds,
                  "host_ms_per_step": 1e3 * (clock.seconds - waited) / steps, "wait_ms_per_step": 1e3 * waited / steps,
                  "padding": 0.0 if fast.packed else float("nan"), "peak_gib": peak, "params": n_params,
                  "rows_per_step": cfg.batch_size, "forwards_per_step": forwards / steps,
                  "packed": fast.packed, "liger": liger_on, "varlen": fast.varlen, "fused_loss": fast.loss.trunk is not None,
                  "cuda_graphs": fast.graphs is not None and not fast.graphs.failed,
                  "graphs_captured": len(fast.graphs.graphs) if fast.graphs else 0,
                  "graph_failure": fast.graphs.failed if fast.graphs else None, "last_loss": loss, **learning}
        del net, base, optimizer, params, fast, loop
    return result
