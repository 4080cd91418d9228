"""One training loop for every method: setup -> fit -> save, top to bottom.

The loss is the mean over every supervised token of an optimizer step (not the mean of
micro-batch means), so gradient accumulation and micro-batch size do not change what is
learned. Before each optimizer step the gradients themselves are checked: a non-finite
step is skipped and counted, and too many in a row stop the run with the last good
checkpoint intact. Under torchrun every process runs this loop on its own share of each
step's rows and rank 0 writes (distributed.py; with one process its calls change nothing).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .config import DataConfig, MitigateConfig, ModelConfig, TrainConfig, check, to_dict
from . import accel, mitigate as mitigation
from .accel import FastPath, Levers
from .data import ChatFormat, Prepared, Rendered, prepare
from .data.replay import mix
from .distributed import SINGLE, World, init as init_world
from .invariants import InvariantBroken, Invariants, probe_rows
from .methods import Method, MethodConfig, count_parameters, selected
from .models import fingerprint, load_model, load_tokenizer, resolve_device
from .runs import (RunDir, assert_finite, check_adapter, check_resume, file_fingerprint,
                   load_trainer_state, rng_state, save_checkpoint, set_rng_state, truncate_metrics,
                   write_atomically, write_json, write_text)
from .step import (OutOfMemory, Readback, apply_update, evaluate_loss, out_of_memory_message, queue_step,
                   read_late, smaller_micro_batch, step_rows)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had non-finite loss or gradients."""


class Interrupted(RuntimeError):
    """SIGTERM / Ctrl-C: a checkpoint was saved; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by the signal


def train(model: ModelConfig, data: DataConfig, method: MethodConfig = MethodConfig(),
          train: TrainConfig = TrainConfig(), mitigate: MitigateConfig = MitigateConfig(),
          out: str = "runs/run", resume: bool = True, allow_config_change: bool = False) -> Path:
    """Fine-tune `model` on `data` with `method`; write a self-describing run directory.

    Args:
        model: the base model.
        data: the training data and how it is rendered.
        method: the fine-tuning method and its options.
        train: optimisation, checkpointing and logging.
        mitigate: keeping general ability: self-replay, KL to the base, checkpoint choice
            (docs/MITIGATION.md); the defaults change nothing.
        out: the run directory.
        resume: continue from the newest complete checkpoint in `out`, if any (exactly: the
            same losses and weights as an uninterrupted run). A changed base model or data
            file is refused; `false` discards the checkpoints and starts over.
        allow_config_change: resume even though settings differ from those the checkpoints
            were trained with (the differences are listed when this is off).
    """
    # Under torchrun each process trains on its own device; rank 0 writes (distributed.py).
    world = init_world(model.device)
    # Before anything is read or written: a directory that is not a tunelab run is refused,
    # and the run is locked against a second `tunelab train` while this one lives.
    with world.claimed(RunDir(Path(out))), world.quiet():
        return _train(model, data, method, train, mitigate, out, resume, allow_config_change, world)


def _train(model: ModelConfig, data: DataConfig, method: MethodConfig, train: TrainConfig,
           mitigate: MitigateConfig, out: str, resume: bool, allow_config_change: bool,
           world: World = SINGLE) -> Path:
    """The run, once claimed: set up -> fit (inside the fast path) -> save."""
    run = RunDir(Path(out))
    job = set_up(model, data, method, train, mitigate, out, resume, allow_config_change, world)
    if job is None:  # finished before, with these settings
        return run.root
    # The one door to the speed levers: entered for the fit, the model restored after.
    with accel.prepare(job.net, job.method.capabilities.supports_packing, job.device, job.autocast,
                       job.pad_id, Levers.from_train(job.cfg), model.attn_implementation,
                       kl=mitigate.kl) as fast:
        restore_trainer_state(job)
        checks = learning_checks(job, fast) if job.cfg.check_learning else None
        record = fit(job, fast, checks)
    del fast
    return save(job, checks, record)


@dataclass
class Job:
    """One run as `set_up` leaves it: the data, the model with its method applied, the
    optimizer; `fit` advances `state` (and may shrink `cfg`'s micro-batch), `save` ends it."""
    run: RunDir
    world: World
    model_cfg: ModelConfig
    data_cfg: DataConfig
    cfg: TrainConfig
    mitigate: MitigateConfig
    method: Method
    device: torch.device
    prepared: Prepared
    pad_id: int
    base: torch.nn.Module
    net: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: object
    steps_per_epoch: int
    total_steps: int
    trainable: int
    total: int
    latest: Path | None = None
    """The checkpoint this run resumes from, if any."""
    replay: list = field(default_factory=list)
    state: dict = field(default_factory=lambda: {"step": 0, "skipped_steps": 0, "bad_in_row": 0,
                                                 "tokens": 0, "elapsed": 0.0})

    def free_model(self) -> None:
        """Drop the training model and optimizer (something else needs the memory next)."""
        self.net = self.base = self.params = self.optimizer = self.scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def set_up(model: ModelConfig, data: DataConfig, method_cfg: MethodConfig, cfg: TrainConfig,
           mitigate: MitigateConfig, out: str, resume: bool, allow_config_change: bool,
           world: World = SINGLE) -> Job | None:
    """Data first (fails fast), then the run directory, then the model with the method applied
    and its optimizer; None when the run has already finished with these settings."""
    run = RunDir(Path(out))
    device = world.place(resolve_device(model.device))  # `--model.device cuda` on a CPU machine fails here
    the_method, options = selected(method_cfg)
    check(not cfg.gradient_checkpointing or the_method.capabilities.supports_checkpointing,
          "train.gradient_checkpointing", f"false for {the_method.name} (it cannot recompute activations)",
          cfg.gradient_checkpointing)
    world = world.choose(cfg, the_method, mitigate.kl, options)  # FSDP2 under torchrun where asked for (fsdp.py)
    config = {"model": to_dict(model), "data": to_dict(data), "method": to_dict(method_cfg),
              "train": to_dict(cfg), "out": str(out)}
    if mitigate.active:  # absent when off: runs made before mitigation existed still resume
        config["mitigate"] = to_dict(mitigate)

    tokenizer = load_tokenizer(model)
    fmt = ChatFormat(tokenizer)
    prepared = prepare(data, fmt)
    print(prepared.summary(data))  # how many rows were skipped, cut or dropped, and why
    # Compared with what the checkpoints were trained on before anything is overwritten.
    inputs = {"base_model": fingerprint(model), "data": file_fingerprint(data.path)}
    world.on_main(run.recover)
    checkpoints = run.complete_checkpoints() if resume else []
    latest = checkpoints[-1] if checkpoints else None
    if latest or (resume and run.done.is_file()):
        changes = check_resume(run, config, inputs, allow_config_change)
        if run.done.is_file() and not changes:
            print(f"{run.root} has already finished with these settings (--resume false trains it again)")
            return None

    def write_run() -> None:
        if latest:
            run.done.unlink(missing_ok=True)
            truncate_metrics(run.metrics, int(latest.name.split("-")[1]))  # steps after it are redone
        elif gone := run.start_over():
            print(f"starting {run.root} over: removed {', '.join(gone)}")
        write_text(run.config, yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        write_json(run.inputs, inputs)
        write_json(run.data_stats, prepared.stats)
        tokenizer.save_pretrained(run.tokenizer)
    world.on_main(write_run)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = load_model(model, device)
    replay = []
    if mitigate.replay > 0:  # the base answers before any adapter exists
        # Under torchrun rank 0 answers and caches them; the other ranks then read its cache
        # instead of generating the same greedy answers again.
        def answered():
            rows, stats = mitigation.replay_rows(mitigate, data, fmt, inputs["base_model"], base, device)
            write_json(run.data_stats, {**prepared.stats, "replay": stats})
            return rows
        replay = world.on_main(answered, "answering the replay prompts")
        if not world.main:
            replay, _ = mitigation.replay_rows(mitigate, data, fmt, inputs["base_model"], base, device)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if latest:
        check_adapter(latest / "adapter", base)
    net = the_method.resume(base, latest / "adapter", options) if latest else the_method.apply(base, options)
    net.train()
    trainable, total = count_parameters(net)
    params = [p for p in net.parameters() if p.requires_grad]
    world.broadcast(params)  # every rank starts from rank 0's weights
    params = world.shard(net, params)
    # Fused on the CPU as on CUDA: one update path, whose in-place writes leave the weights'
    # version counters alone on both (the CPU tests see what the GPU does).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and base.dtype == torch.bfloat16 else nullcontext())
    mitigation.check_kl_possible(mitigate, net, the_method.capabilities.adapter_kind)
    return Job(run=run, world=world, model_cfg=model, data_cfg=data, cfg=cfg, mitigate=mitigate,
               method=the_method, device=device, prepared=prepared, pad_id=tokenizer.pad_token_id,
               base=base, net=net, params=params, optimizer=optimizer, scheduler=scheduler,
               autocast=autocast, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               trainable=trainable, total=total, latest=latest, replay=replay)


def restore_trainer_state(job: Job) -> None:
    """Optimizer, scheduler, RNG and step counters of the checkpoint being resumed (if any),
    then each rank's dropout stream."""
    if job.latest:
        saved = load_trainer_state(job.latest)
        job.world.load_optimizer(job.net, job.optimizer, saved["optimizer"])
        job.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        job.state.update(json.loads((job.latest / "state.json").read_text()))
        if job.cfg.auto_micro_batch and "micro_batch_size" in job.state:  # found by an earlier attempt
            job.cfg = replace(job.cfg, micro_batch_size=job.state["micro_batch_size"],
                              micro_batch_tokens=job.state["micro_batch_tokens"])
        print(f"resuming from {job.latest} (step {job.state['step']} of {job.total_steps})")
    job.world.seed_dropout(job.cfg.seed, job.state["step"])


def learning_checks(job: Job, fast: FastPath) -> Invariants:
    """`--train.check_learning`: the invariants, their first measurements taken now."""
    net = job.net
    checks = Invariants(net, fast, probe_rows(job.prepared.val, job.prepared.train),
                        lambda rows: evaluate_loss(net, rows, job.cfg, fast, job.device, job.autocast),
                        job.device, job.autocast, job.base.dtype)
    checks.before_training(job.params)
    return checks


def fit(job: Job, fast: FastPath, checks: Invariants | None) -> dict:
    """Optimizer steps until `total_steps`: log, evaluate, check, checkpoint; a signal stops
    after the step under way, with a checkpoint. Returns the last logged record."""
    run, world, device, state, prepared = job.run, job.world, job.device, job.state, job.prepared
    net, params, optimizer, scheduler, autocast = job.net, job.params, job.optimizer, job.scheduler, job.autocast
    total_steps, steps_per_epoch, mitigate = job.total_steps, job.steps_per_epoch, job.mitigate
    applied = {"steps": 0}
    print(f"{job.method.name}: {job.trainable:,} trainable of {job.total:,} parameters "
          f"({100 * job.trainable / job.total:.3f}%); {len(prepared.train)} train rows, "
          f"{len(prepared.val)} held-out; {total_steps} optimizer steps on {device}"
          + (f" (rank 0 of {world.size} processes)" if world.size > 1 else ""))
    longest = max(len(r.input_ids) for r in prepared.train)
    record: dict = {}
    metrics = open(run.metrics if world.main else os.devnull, "a", encoding="utf-8")  # rank 0 logs
    writer = tensorboard_writer(run) if job.cfg.tensorboard and world.main else None
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {job.method.name}",
               dynamic_ncols=True, disable=not world.main)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter() - state["elapsed"]

    def settle(queued: tuple) -> dict:
        """Read back a queued step's loss and gradient norm (waits for that step only)."""
        number, readback, lr, tokens, elapsed = queued
        loss, grad_norm = readback.tolist()
        if math.isfinite(loss) and math.isfinite(grad_norm):
            state["bad_in_row"] = 0
            applied["steps"] += 1
            if checks:
                checks.after_step()
        else:  # its update was skipped (apply_update): keep count
            state["skipped_steps"] += 1
            state["bad_in_row"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:.0f}")
        return {"step": number, "epoch": round(number / steps_per_epoch, 3), "loss": loss,
                "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                "skipped_steps": state["skipped_steps"]}

    # On a GPU a step's loss is read back only after the next step is queued, so the GPU
    # never waits for the host between steps; steps that evaluate, save, stop or end are read
    # at once, and a step still unread when the run fails is read (and logged) on the way out.
    lagged = read_late(device)
    pending = None
    with stop_requests(state) as stop:
        try:
            while state["step"] < total_steps:
                step = state["step"]
                rows = step_rows(prepared.train, job.cfg, step, steps_per_epoch)
                if job.replay or fast.kl:
                    rows = mix(rows, job.replay, mitigate.replay, job.cfg.batch_size, step, job.cfg.seed,
                               mitigate.kl_on if fast.kl else None)
                values, n_tokens = queue_step_fitting(job, fast, rows, step, longest)
                readback = Readback(values)  # queued now: reading it later waits for this step only
                apply_update(optimizer, values)  # skipped when the loss or the gradients are not finite
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]  # the LR this step used; after step() it is the next one's
                scheduler.step()
                cfg = job.cfg
                state["step"] = step + 1
                state["tokens"] += n_tokens
                state["elapsed"] = time.perf_counter() - started
                end_of_epoch = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
                evaluate_now = bool(prepared.val) and (
                    end_of_epoch if cfg.eval_every == 0
                    else state["step"] % cfg.eval_every == 0 or state["step"] == total_steps)
                save_now = bool(cfg.save_every) and state["step"] % cfg.save_every == 0
                # Read once: a signal arriving later in this step stops after the next one (under several
                # processes, every rank decides on the same value: the agreed one).
                stopping = world.agreed_signal(stop["signal"])
                queued = (state["step"], readback, lr, state["tokens"], state["elapsed"])
                settled = [settle(pending)] if pending else []
                pending = queued
                if not lagged or evaluate_now or save_now or stopping or state["step"] == total_steps:
                    settled.append(settle(pending))
                    pending = None
                for record in settled:
                    if record["step"] == state["step"] and evaluate_now:
                        record["val_loss"] = evaluate_loss(net, prepared.val, cfg, fast, device, autocast, world)
                        net.train()
                    if checks and record["step"] == state["step"] and (evaluate_now or save_now
                                                                      or state["step"] == total_steps):
                        record.update(checks.check(record["step"], applied["steps"]))  # before any save
                    if record["step"] % cfg.log_every == 0 or "val_loss" in record or record["step"] == total_steps:
                        log(metrics, writer, record)
                    if state["bad_in_row"] >= cfg.max_bad_steps:
                        raise diverged(run, state["bad_in_row"], record["step"])
                # No checkpoint inside a run of skipped steps: resuming should start before it.
                if (save_now and not state["bad_in_row"]) or stopping:
                    world.write(lambda model, optim: save_checkpoint(run, state["step"], model, job.method, optim,
                                                                     scheduler, state, cfg.keep_checkpoints),
                                net, optimizer, "saving a checkpoint")  # sharded: gathered to rank 0 first
                if stopping:
                    raise Interrupted(f"stopped by {signal.Signals(stopping).name} after step "
                                      f"{state['step']} of {total_steps}; checkpoint saved in "
                                      f"{run.complete_checkpoints()[-1]}. Resume with: "
                                      f"tunelab train --config {run.config}", stopping)
        except torch.cuda.OutOfMemoryError as err:  # outside the forward/backward (optimizer, eval)
            raise OutOfMemory(out_of_memory_message(job.cfg, fast.packed, longest, str(err).split("\n")[0],
                                                    state["step"], job.data_cfg.max_length)) from None
        finally:
            if pending is not None:  # the run failed after queueing this step: keep its record
                try:
                    record = settle(pending)
                    if record["step"] % job.cfg.log_every == 0:
                        log(metrics, writer, record)
                except Exception:  # noqa: BLE001 - the device may be what failed; the first error wins
                    pass
            bar.close()
            metrics.close()
            if writer:
                writer.close()
    return record


@contextmanager
def stop_requests(state: dict):
    """Within the block SIGTERM / Ctrl-C ask the loop to stop after the step under way (the
    yielded dict's `signal`); a second one stops at once. Handlers are put back after."""
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt  # a second signal stops at once; checkpoints on disk are whole
        stop["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: finishing step {state['step'] + 1}, then saving a "
              f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    # Python delivers signals to the main thread only (a UI may run training in another one).
    handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def diverged(run: RunDir, bad_in_row: int, step: int) -> TrainingDiverged:
    good = run.complete_checkpoints()
    return TrainingDiverged(
        f"{bad_in_row} optimizer steps in a row had non-finite loss or gradients (steps "
        f"{step - bad_in_row + 1}-{step}, all skipped); the last good checkpoint is "
        f"{good[-1] if good else 'none (no checkpoint was saved yet)'}. Resume from it "
        f"with a lower --train.lr or --model.dtype fp32 (and --allow_config_change true)")


def queue_step_fitting(job: Job, fast: FastPath, rows: list[Rendered], step: int,
                       longest: int) -> tuple[torch.Tensor, int]:
    """`queue_step`; after a CUDA out-of-memory error in the forward/backward, again with half
    the micro-batch (`smaller_micro_batch`, which raises OutOfMemory unless allowed)."""
    rng = rng_state() if job.cfg.auto_micro_batch else None
    while True:  # more than once only after an out-of-memory error
        try:
            return queue_step(job.net, rows, job.cfg, fast, job.device, job.autocast, job.params, job.world)
        except torch.cuda.OutOfMemoryError as err:  # leaving this block frees the step's tensors
            why = str(err).split("\n")[0]
        job.optimizer.zero_grad(set_to_none=True)
        job.cfg = smaller_micro_batch(job.cfg, fast.packed, longest, why, step, job.device, job.data_cfg.max_length)
        job.state.update(micro_batch_size=job.cfg.micro_batch_size, micro_batch_tokens=job.cfg.micro_batch_tokens)
        set_rng_state(rng)  # the retried step draws the same dropout masks


def save(job: Job, checks: Invariants | None, record: dict) -> Path:
    """The adapter (reload-checked with --train.check_learning), the checkpoint choice, the
    summary, then DONE."""
    run, world, device, state, mitigate = job.run, job.world, job.device, job.state, job.mitigate
    net = job.net
    assert_finite(net, "the adapter")
    world.write(lambda model, _: write_atomically(run.adapter, lambda tmp: job.method.save(model, tmp)), net,
                what="saving the adapter")
    checked = None
    if checks:  # the saved adapter reloaded alone: free the training model first
        checks.net = checks.fast = checks.training_loss = None
        del net
        job.free_model()
        checked = world.on_main(lambda: check_saved(run, checks, device), "the reload check")
    selection = None
    if mitigate.select != "last":  # scored on an engine of its own: the training model goes first
        net = checks = None
        job.free_model()
        selection = world.on_main(
            lambda: mitigation.select_checkpoint(run.root, mitigate, job.model_cfg, job.data_cfg.system_prompt),
            "choosing the checkpoint")
    cfg = job.cfg
    summary = {
        "method": job.method.name, "trainable_params": job.trainable, "total_params": job.total,
        "steps": state["step"], "skipped_steps": state["skipped_steps"], "tokens": state["tokens"],
        "wall_time_s": round(state["elapsed"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9), 1),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                            if device.type == "cuda" else None),
        "final_train_loss": record.get("loss"), "final_val_loss": record.get("val_loss"),
        "device": str(device),
        "micro_batch_size": cfg.micro_batch_size, "micro_batch_tokens": cfg.micro_batch_tokens,
        "learning_checks": checked,
        **({"processes": world.size} if world.size > 1 else {}),
    }
    if selection:
        summary["selection"] = selection

    def finish() -> None:
        write_json(run.summary, summary)
        run.done.write_text("ok\n")
    world.on_main(finish, "writing the summary")
    print(f"done: {run.root} ({summary['wall_time_s']} s, {summary['tokens_per_s']} tokens/s)")
    return run.root


def check_saved(run: RunDir, checks: Invariants, device: torch.device) -> dict:
    """The reload invariant; a saved adapter that fails it is moved to adapter.rejected, so no
    later verb loads it."""
    try:
        return checks.reloaded(run.root, device)
    except InvariantBroken:
        rejected = run.root / "adapter.rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        run.adapter.rename(rejected)
        raise


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
