"""Keeping general ability while fine-tuning: self-replay and KL to the base (docs/MITIGATION.md).

- Self-replay: before training, the base model answers the bundled general prompts
  (data/replay.py) under the run's own system prompt, greedily, through `generate.Engine`;
  the answers become extra training rows mixed into every optimizer step. They are
  generated once per (base fingerprint, prompt set, system prompt, generation settings)
  and cached under the tunelab cache, the key in the file's name.
- KL to the base: on the answer tokens of marked rows (`KLRow`), the loss adds
  `kl` x KL(base || tuned) of the next-token distributions. The base is the same model with
  the adapter off (PEFT's `disable_adapter()`; for P-Tuning and prompt tuning the model
  without its virtual tokens), computed under no_grad: no second copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .accel import with_prompt
from .config import ConfigError, DataConfig, GenerationConfig, MitigateConfig
from .data import ChatFormat, Rendered, render_all
from .data.formats import Example, load_examples
from .data.replay import KLRow, load_prompts, prompts_sha256
from .data.template import IGNORE
from .evaluate.checkers import load_probes
from .evaluate.common import Context, probe_suite
from .generate import BASE, Engine
from .pull import cache_root
from .runs import RunDir, write_atomically


# -- the loss ---------------------------------------------------------------------------------

def ce_kl_sum(logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor,
              weight: float) -> torch.Tensor:
    """Sum over positions of cross-entropy(logits, targets) + weight x KL(base || tuned).

    KL(base || tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v)): the distillation
    direction, whose gradient on the tuned logits is p_tuned - p_base (bounded, zero where
    the two agree). With weight 0 it is exactly `F.cross_entropy(..., reduction="sum")`.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(dtype), targets, reduction="sum")
    if weight == 0:
        return ce
    tuned = F.log_softmax(logits.to(dtype), -1)
    base = F.log_softmax(base_logits.to(dtype), -1)
    return ce + weight * (base.exp() * (base - tuned)).sum()


def without_virtual_tokens(batch: dict, positions: torch.Tensor, prefix: int) -> tuple[dict, torch.Tensor]:
    """A packed batch whose rows carry `prefix` placeholder positions (data.packing.packed_inputs),
    without them, and `positions` mapped to the new flat indices (what the base, which has
    no virtual tokens, sees)."""
    keep = batch["position_ids"][0] >= prefix
    new_index = keep.cumsum(0) - 1
    rows = batch["cu_seq_lens_q"].shape[0] - 1
    cu = batch["cu_seq_lens_q"] - prefix * torch.arange(rows + 1, device=keep.device, dtype=torch.int32)
    stripped = {"input_ids": batch["input_ids"][:, keep], "position_ids": batch["position_ids"][:, keep] - prefix,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": batch["max_length_q"] - prefix, "max_length_k": batch["max_length_k"] - prefix}
    return stripped, new_index[positions]


def loss_sum_with_kl(net: torch.nn.Module, batch: dict, plan, device, autocast) -> torch.Tensor:
    """`accel.loss.token_loss_sum` of a micro-batch of `KLRow`s (`batch["kl"]` holds the weight)
    plus the KL term on the same supervised positions. The tuned logits of those positions
    are computed whole (no chunked cross-entropy): the KL term needs them."""
    weight = batch["kl"]
    labels = batch["labels"].flatten()
    positions = (labels != IGNORE).nonzero().squeeze(1)
    targets = labels[positions].to(device, non_blocking=True)
    positions = positions.to(device, non_blocking=True)
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items() if k not in ("labels", "kl")}
    trunk_path = plan.trunk is not None and (not plan.prefix or "cu_seq_lens_q" in batch)
    with torch.no_grad(), adapter_off(net), autocast:
        if trunk_path:
            seen, at = without_virtual_tokens(batch, positions, plan.prefix) if plan.prefix else (batch, positions)
            base_logits = plan.head(plan.trunk(**seen, use_cache=False).last_hidden_state.flatten(0, 1)[at])
        else:  # PEFT's own forward; with the adapter off there are no virtual tokens to skip
            base_logits = net(**batch, use_cache=False).logits.flatten(0, 1)[positions]
    with autocast:
        if trunk_path:
            inputs = with_prompt(plan, batch) if plan.prefix else batch
            logits = plan.head(plan.trunk(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions])
        else:
            logits = net(**batch, use_cache=False).logits[:, plan.prefix:].flatten(0, 1)[positions]
    return ce_kl_sum(logits, base_logits, targets, weight)


@contextmanager
def adapter_off(net: torch.nn.Module):
    """PEFT's `disable_adapter()`, with every parameter's `requires_grad` put back as it was
    (PEFT re-enables by marking the whole active adapter trainable, which a method that
    freezes part of it would not want)."""
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        with net.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def kl_micro_batches(rows: list[Rendered], fast, micro_batch_size: int, micro_batch_tokens: int) -> list[dict]:
    """`fast.micro_batches` of `rows`, with the `KLRow`s in micro-batches of their own that
    carry the KL weight (`fast.kl`)."""
    marked = [r for r in rows if isinstance(r, KLRow)]
    if not marked or not fast.kl:
        return fast.micro_batches(rows, micro_batch_size, micro_batch_tokens)
    plain = [r for r in rows if not isinstance(r, KLRow)]
    batches = fast.micro_batches(plain, micro_batch_size, micro_batch_tokens) if plain else []
    return batches + [dict(b, kl=fast.kl) for b in fast.micro_batches(marked, micro_batch_size, micro_batch_tokens)]


def check_kl_possible(cfg: MitigateConfig, net: torch.nn.Module, adapter_kind: str) -> None:
    """The KL term needs the base back from the training model: a PEFT adapter that can be
    switched off. Freeze and full training overwrite the base's own weights; keeping a copy
    would double their memory, so they are refused."""
    if cfg.kl > 0 and (adapter_kind == "whole_model" or not hasattr(net, "disable_adapter")):
        raise ConfigError("`--mitigate.kl` needs a method whose base can be recovered by switching the "
                          "adapter off (LoRA and its family, IA3, P-Tuning, prompt and prefix tuning); this "
                          "method trains the base's own weights: use --mitigate.kl 0 (replay still works)")


# -- self-replay ------------------------------------------------------------------------------

def cache_dir() -> Path:
    return cache_root() / "replay"


def replay_rows(cfg: MitigateConfig, data: DataConfig, fmt: ChatFormat, base_fingerprint: dict,
                model: torch.nn.Module, device: torch.device) -> tuple[list[Rendered], dict]:
    """The rendered replay rows of a run and a description of them for data_stats.json:
    the user's `replay_data` file, or the base model's own answers to the bundled prompts."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's seeds stay
        rows, stats = _replay_rows(cfg, data, fmt, base_fingerprint, model, device)
    if not rows:
        raise ConfigError(f"`--mitigate.replay`: no replay row is left after rendering ({stats}); raise "
                          f"--data.max_length or give --mitigate.replay_data")
    return rows, stats


def _replay_rows(cfg: MitigateConfig, data: DataConfig, fmt: ChatFormat, base_fingerprint: dict,
                 model: torch.nn.Module, device: torch.device) -> tuple[list[Rendered], dict]:
    if cfg.replay_data:
        loaded = load_examples(cfg.replay_data, data.system_prompt, "skip")
        rows, _, dropped = render_all(loaded.examples, fmt, data)
        if not rows:
            raise ConfigError(f"`--mitigate.replay_data` {cfg.replay_data}: no usable row (of {loaded.n_read})")
        return rows, {"source": cfg.replay_data, "rows": len(rows), "dropped": dropped + len(loaded.bad)}
    prompts = load_prompts(cfg.replay_prompts)
    gen = GenerationConfig(max_new_tokens=cfg.replay_max_new_tokens)
    key = {"base_model": base_fingerprint, "prompts_sha256": prompts_sha256(prompts),
           "system_prompt": data.system_prompt, "gen": {"max_new_tokens": gen.max_new_tokens, "greedy": True},
           "chat_template_sha256": hashlib.sha256(str(fmt.tokenizer.chat_template).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"answers-{digest}.jsonl"
    if path.is_file():
        answers = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        print(f"self-replay: {len(answers)} base-model answers from {path}")
    else:
        answers = generate_answers(prompts, data.system_prompt, gen, model, fmt, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process (torchrun)
        tmp.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers), encoding="utf-8")
        tmp.replace(path)
        print(f"self-replay: the base answered {len(answers)} general prompts; cached in {path}")
    rows, unfinished = [], 0
    for a in answers:
        messages = ([{"role": "system", "content": data.system_prompt}] if data.system_prompt else []) + [
            {"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["answer"]}]
        examples = [Example(messages=messages, source=f"replay:{a['id']}")]
        rendered, _, _ = render_all(examples, fmt, data)
        if not rendered:
            continue
        row = rendered[0]
        if not a["finished"]:  # cut at max_new_tokens: learn the text, not an end of turn there
            row = without_final_end_of_turn(row, fmt.end_of_turn_id)
            unfinished += 1
        if row.num_supervised:
            rows.append(row)
    return rows, {"source": str(path), "prompts": len(prompts), "rows": len(rows), "unfinished_answers": unfinished,
                  "key": key | {"base_model": "(fingerprint in inputs.json)"}}


def generate_answers(prompts: list[dict], system_prompt: Optional[str], gen: GenerationConfig,
                     model: torch.nn.Module, fmt: ChatFormat, device: torch.device) -> list[dict]:
    """The base model's greedy answers, batched through `generate.Engine`; `model`'s weight
    layout and training mode are left as they were."""
    layout = {name: (p.data, p.data.stride()) for name, p in model.named_parameters()}
    was_training = model.training
    engine = Engine(model, fmt.tokenizer, device)
    conversations = [([{"role": "system", "content": system_prompt}] if system_prompt else [])
                     + [{"role": "user", "content": p["prompt"]}] for p in prompts]
    ids = engine.complete([engine.format.prompt_ids(c) for c in conversations], gen,
                          batch_size=64, progress=True)
    texts = [engine.decode(i) for i in ids]
    del engine
    for name, p in model.named_parameters():  # Engine stores CPU weights column-major for decoding
        if p.data.stride() != layout[name][1]:
            p.data = p.data.contiguous()
    model.train(was_training)
    return [{"id": p["id"], "prompt": p["prompt"], "answer": text, "finished": len(i) < gen.max_new_tokens}
            for p, i, text in zip(prompts, ids, texts)]


def without_final_end_of_turn(row: Rendered, end_of_turn_id: int) -> Rendered:
    """`row` with its last supervised end-of-turn token (and anything supervised after it)
    no longer supervised."""
    labels = list(row.labels)
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] == end_of_turn_id:
            labels[i:] = [IGNORE] * (len(labels) - i)
            break
    return Rendered(row.input_ids, labels, row.truncated)


# -- checkpoint choice ----------------------------------------------------------------------

def select_checkpoint(run_root: Path, cfg: MitigateConfig, model_cfg, system_prompt: Optional[str]) -> dict:
    """Score the final weights and every saved checkpoint on `cfg.select_persona_probes` and the
    bundled general probes, both under the persona `system_prompt` (`cfg.select_limit` items
    each, greedy), and make the best under `cfg.select` RUN/adapter. The final weights, if not
    chosen, are kept in RUN/checkpoints/last-adapter. Returns the choice with every score.

    Rule `persona_keep_general`: the highest persona score among candidates whose general
    score is >= `select_keep` x the base's (ties: more general ability, then the later step);
    if none keeps that much, the one with the most general ability.
    """
    run = RunDir(run_root)
    steps = {ckpt.name: ckpt for ckpt in run.complete_checkpoints()}
    ctx = Context(gen=GenerationConfig(max_new_tokens=48), system_prompt=system_prompt, batch_size=64,
                  limit=cfg.select_limit)
    with tempfile.TemporaryDirectory(prefix="tunelab-select-") as tmp:
        views = {"final": run.root}
        for name, ckpt in steps.items():  # a run-shaped view of each checkpoint, for Engine
            view = Path(tmp) / name
            view.mkdir()
            for entry in ("config.yaml", "inputs.json", "tokenizer"):
                (view / entry).symlink_to(run.root / entry)
            (view / "adapter").symlink_to(ckpt / "adapter")
            views[name] = view
        engine = Engine.from_runs(views, model=model_cfg, tokenizer=run.tokenizer)
        models = [BASE] + list(views)
        persona = probe_suite(engine, models, ctx, load_probes(cfg.select_persona_probes), "select_persona",
                              system_prompt, "checkpoint choice: persona")
        general = probe_suite(engine, models, ctx, load_probes(None), "select_general", system_prompt,
                              "checkpoint choice: general under the persona prompt")
        del engine
    mean = lambda scores: sum(scores.values()) / max(len(scores), 1)  # noqa: E731
    scores = {m: {"persona": round(mean(persona.scores[m]), 4), "general": round(mean(general.scores[m]), 4)}
              for m in models}
    chosen, why = choose(scores, list(views), cfg.select_keep)
    if chosen != "final":
        last = run.checkpoints / "last-adapter"
        if last.exists():
            shutil.rmtree(last)
        shutil.copytree(run.adapter, last)
        write_atomically(run.adapter, lambda t: shutil.copytree(steps[chosen] / "adapter", t, dirs_exist_ok=True))
    print(f"--mitigate.select {cfg.select}: chose {chosen} ({why}); " + ", ".join(
        f"{m}: persona {s['persona']:.2f} general {s['general']:.2f}" for m, s in scores.items()))
    return {"rule": cfg.select, "keep": cfg.select_keep, "limit": cfg.select_limit,
            "persona_probes": cfg.select_persona_probes, "scores": scores, "chosen": chosen, "why": why}


def choose(scores: dict, candidates: list[str], keep: float, base: str = "base") -> tuple[str, str]:
    """(chosen candidate, why) under `persona_keep_general` (see `select_checkpoint`);
    candidates are `final` and checkpoint names (`step-0000100`), `scores[name]` has persona and general."""
    floor = keep * scores[base]["general"]
    step = lambda m: float("inf") if m == "final" else int(m.split("-")[1])  # noqa: E731
    keeping = [m for m in candidates if scores[m]["general"] >= floor]
    if keeping:
        chosen = max(keeping, key=lambda m: (scores[m]["persona"], scores[m]["general"], step(m)))
        return chosen, f"the most persona among those keeping general >= {keep:g} x base ({floor:.3f})"
    chosen = max(candidates, key=lambda m: (scores[m]["general"], scores[m]["persona"], step(m)))
    return chosen, f"no candidate kept general >= {keep:g} x base ({floor:.3f}): the most general ability"
