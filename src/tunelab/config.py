"""Small dataclasses shared by the verbs.

Each field is documented once, where it is defined; jsonargparse turns that text into
`--help`, and the dotted flag (`--train.lr`) is the same name a YAML config uses
(`train: {lr: ...}`). Each dataclass validates its own fields and names the flag in the
message, so a bad value never reaches the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A config value is out of range; the message names the flag."""


def check(ok: bool, flag: str, accepted: str, got: Any) -> None:
    """Raise a ConfigError naming `flag` unless `ok`."""
    if not ok:
        raise ConfigError(f"`--{flag}` must be {accepted}, got {got!r}")


@dataclass
class ModelConfig:
    path: str = ""
    """A local HF model directory, a `.gguf` file, a hub id (`Qwen/Qwen2-1.5B-Instruct`) or a
    catalog name (`smollm2-135m-instruct`, fetched once by `tunelab pull`)."""
    hub: Literal["hf", "modelscope"] = "hf"
    """Where a hub id is fetched from; `modelscope` needs the `modelscope` extra."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights and compute dtype; `auto` is bf16 on a CUDA card that supports it, else fp32."""
    device: str = "auto"
    """`auto` (first CUDA card, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    attn_implementation: Optional[str] = None
    """transformers attention backend (`sdpa`, `eager`, `flex_attention`); None lets tunelab choose."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    allow_pickle: bool = False
    """Accept pickle weights (.bin/.pt); even then they load with `weights_only=True`."""

    def __post_init__(self) -> None:
        kind, _, index = self.device.partition(":")
        check(self.device == "auto" or (kind in ("cpu", "cuda", "mps") and (not index or index.isdigit())),
              "model.device", "auto, cpu, cuda, cuda:N or mps", self.device)
        check(self.hub in ("hf", "modelscope"), "model.hub", "hf or modelscope", self.hub)
        check(self.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "auto, bf16, fp16 or fp32", self.dtype)


@dataclass
class DataConfig:
    path: str = ""
    """Training data: .json or .jsonl with alpaca, `messages` or sharegpt `conversations` rows."""
    system_prompt: Optional[str] = None
    """System prompt for rows that have none (the reference uses 现在你要扮演皇帝身边的女人--甄嬛)."""
    max_length: int = 384
    """Longest tokenized row; longer rows are handled by `truncation`."""
    truncation: Literal["prompt", "drop", "error"] = "prompt"
    """Rows over max_length: `prompt` cuts the conversation's start (never the last reply or
    its end-of-turn token), `drop` drops the row, `error` stops."""
    supervise: Literal["all", "last"] = "all"
    """Which assistant turns of a multi-turn row are learned."""
    on_error: Literal["stop", "skip"] = "stop"
    """Bad records: `stop` lists them all and stops; `skip` drops them and says how many and why."""
    val_size: float = 0.0
    """Held-out split: a fraction (< 1) or a row count (>= 1) of the data, drawn with `seed`."""
    limit: Optional[int] = None
    """Use only the first N valid rows (quick runs)."""
    seed: int = 42
    """Seed of the held-out split."""

    def __post_init__(self) -> None:
        check(self.max_length > 0, "data.max_length", "> 0", self.max_length)
        check(self.val_size >= 0, "data.val_size", ">= 0 (a fraction or a row count)", self.val_size)
        check(self.limit is None or self.limit > 0, "data.limit", "> 0 or null", self.limit)
        check(self.val_size < 1 or float(self.val_size).is_integer(), "data.val_size",
              "a fraction below 1 or a whole row count", self.val_size)
        check(self.seed >= 0, "data.seed", ">= 0", self.seed)
        check(self.truncation in ("prompt", "drop", "error"), "data.truncation", "prompt, drop or error",
              self.truncation)
        check(self.supervise in ("all", "last"), "data.supervise", "all or last", self.supervise)
        check(self.on_error in ("stop", "skip"), "data.on_error", "stop or skip", self.on_error)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    """Passes over the training rows (fractions allowed)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 40
    """Rows per optimizer step (the reference: 10 x 4 accumulation)."""
    micro_batch_size: int = 10
    """Rows per forward pass; batch_size / micro_batch_size steps are accumulated."""
    lr: float = 1e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower (docs/PERFORMANCE.md)."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Padding-free batches (rows concatenated, attention kept within each row). `auto`:
    on where the model and method support it on a GPU, off on CPU."""
    micro_batch_tokens: int = 16384
    """Packed micro-batches: most tokens in one forward pass. A step's rows are packed whole
    into as few passes as fit; the optimizer step still covers `batch_size` rows, so this
    changes memory and speed, not what is learned."""
    cuda_graphs: bool = True
    """Replay packed micro-batches as CUDA graphs (captured once per padded size) instead of
    launching every kernel from Python; off: eager. Not used with gradient checkpointing."""
    kernels: Literal["auto", "liger", "torch"] = "auto"
    """RMSNorm, RoPE and SwiGLU kernels on CUDA: `liger` (fused Triton kernels from
    liger-kernel, the `tunelab[liger]` extra; norms with a frozen weight then run tunelab's
    own RMSNorm kernels), `torch` (transformers' own), `auto` (liger where it is installed
    and covers the model). The gains: docs/PERFORMANCE.md."""
    lora_dropout_kernel: Literal["copies", "bits"] = "copies"
    """Fused LoRA's dropout on CUDA: `copies` keeps each projection's dropped input for the
    backward (fastest); `bits` keeps only the masks, as bits, and one kernel recomputes from
    the input: less memory for a little speed, and the faster choice at a low memory budget
    (docs/PERFORMANCE.md)."""
    compile: bool = False
    """torch.compile each decoder layer (shapes dynamic) before training, with transformers'
    own norm, RoPE and SwiGLU (not liger's); compilation takes minutes (docs/PERFORMANCE.md)."""
    eval_every: int = 0
    """Held-out loss every N optimizer steps (0: once per epoch)."""
    save_every: int = 100
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row with non-finite loss or gradients (each
    is skipped: the weights never take a non-finite update)."""
    auto_micro_batch: bool = False
    """On a CUDA out-of-memory error, halve the micro-batch (`micro_batch_size`, or
    `micro_batch_tokens` when packed) and redo the step; `batch_size` is kept."""
    seed: int = 42
    """Seed for initialization, data order and dropout."""
    tensorboard: bool = False
    """Also log to RUN/tensorboard (needs the `tensorboard` package)."""
    check_learning: bool = True
    """Hold the run to the invariants of `invariants.py` on 8 probe rows: the first step
    changes the weights; at every evaluation and checkpoint the training path's loss equals
    plain PEFT's on the same weights and has moved; the saved adapter, reloaded as `chat`
    loads it, gives the training-time loss. A broken one stops the run before it saves."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun (several processes): `fsdp` shards the weights, gradients and AdamW
    state across the processes (FSDP2; for full, freeze and LoRA with its variants, whose
    frozen base is sharded while the adapter trains; refused for qlora, ia3 and the
    virtual-token methods); `ddp` replicates them and all-reduces the gradients; `auto`:
    fsdp for full and freeze, ddp for adapters. One process: no effect (docs/DISTRIBUTED.md)."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.epochs) and self.epochs > 0, "train.epochs", "> 0", self.epochs)
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "> 0 or null", self.max_steps)
        check(self.batch_size > 0, "train.batch_size", "> 0", self.batch_size)
        check(self.micro_batch_size > 0, "train.micro_batch_size", "> 0", self.micro_batch_size)
        check(self.micro_batch_tokens > 0, "train.micro_batch_tokens", "> 0", self.micro_batch_tokens)
        check(self.batch_size % self.micro_batch_size == 0, "train.batch_size",
              f"a multiple of --train.micro_batch_size ({self.micro_batch_size})", self.batch_size)
        check(math.isfinite(self.lr) and self.lr > 0, "train.lr", "> 0", self.lr)
        check(self.schedule in ("cosine", "linear", "constant"), "train.schedule", "cosine, linear or constant",
              self.schedule)
        check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        check(self.eval_every >= 0, "train.eval_every", ">= 0 (0: once per epoch)", self.eval_every)
        check(self.save_every >= 0, "train.save_every", ">= 0 (0: never)", self.save_every)
        check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        check(self.seed >= 0, "train.seed", ">= 0", self.seed)
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", self.warmup_ratio)
        check(self.max_grad_norm >= 0, "train.max_grad_norm", ">= 0", self.max_grad_norm)
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        check(self.max_bad_steps >= 1, "train.max_bad_steps", ">= 1", self.max_bad_steps)
        check(self.packing in ("auto", "on", "off"), "train.packing", "auto, on or off", self.packing)
        check(self.kernels in ("auto", "liger", "torch"), "train.kernels", "auto, liger or torch", self.kernels)
        check(not (self.compile and self.kernels == "liger"), "train.kernels",
              "auto or torch with --train.compile true (liger's kernels break torch.compile's graphs; "
              "compiled layers run transformers' own, which inductor fuses)", self.kernels)
        check(self.lora_dropout_kernel in ("copies", "bits"), "train.lora_dropout_kernel", "copies or bits",
              self.lora_dropout_kernel)
        check(self.distributed in ("auto", "ddp", "fsdp"), "train.distributed", "auto, ddp or fsdp",
              self.distributed)


@dataclass
class MitigateConfig:
    replay: float = 0.0
    """Self-replay: the fraction of each optimizer step's rows that are general rows answered
    by the base model itself (0.2: a step of `batch_size` training rows gains
    round(batch_size * 0.2 / 0.8) replay rows). 0 turns replay off."""
    replay_data: Optional[str] = None
    """Your own general data file (.json/.jsonl, any layout `--data.path` reads) to replay
    instead of the base model's answers to the bundled prompts; needs `replay` > 0."""
    replay_prompts: Optional[int] = None
    """Use only the first N bundled general prompts (assets/replay/general_prompts.jsonl,
    560 prompts, Chinese and English); None: all. Fewer prompts: less generation time."""
    replay_max_new_tokens: int = 128
    """Longest base-model answer generated for a replay prompt (greedy)."""
    kl: float = 0.0
    """Weight of KL(base || tuned) of the next-token distributions, added to the loss on each
    `kl_on` answer token; the base is the same model with the adapter off. 0 turns it off."""
    kl_on: Literal["replay", "all"] = "replay"
    """Tokens the KL term covers: the replay rows' answer tokens, or the training rows' too."""
    select: Literal["last", "persona_keep_general"] = "last"
    """Which weights become RUN/adapter: `last` (the final step's), or `persona_keep_general`:
    of the saved checkpoints and the final weights, the one with the highest persona score
    whose general score under the persona prompt is >= `select_keep` x the base's (else the
    one keeping the most general ability)."""
    select_keep: float = 0.95
    """`persona_keep_general`: the share of the base's general score a choice must keep."""
    select_persona_probes: Optional[str] = None
    """Persona probe file the choice is scored on (`persona_keep_general` needs one). Use a
    set other than the final evaluation's, or the final comparison is biased."""
    select_limit: int = 24
    """Items of each probe set scored per candidate (evenly spaced; fewer: faster, noisier)."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.replay) and 0 <= self.replay < 1, "mitigate.replay", "in [0, 1)", self.replay)
        check(self.replay_data is None or self.replay > 0, "mitigate.replay",
              "> 0 when --mitigate.replay_data is given (the share of each step's rows it fills)", self.replay)
        check(self.replay_prompts is None or self.replay_prompts > 0, "mitigate.replay_prompts", "> 0 or null",
              self.replay_prompts)
        check(self.replay_max_new_tokens > 0, "mitigate.replay_max_new_tokens", "> 0", self.replay_max_new_tokens)
        check(math.isfinite(self.kl) and self.kl >= 0, "mitigate.kl", ">= 0", self.kl)
        check(self.kl_on in ("replay", "all"), "mitigate.kl_on", "replay or all", self.kl_on)
        if self.kl > 0 and self.kl_on == "replay" and self.replay == 0:
            raise ConfigError("`--mitigate.kl` acts on the replay rows' tokens (--mitigate.kl_on replay), but "
                              "--mitigate.replay is 0: set --mitigate.replay > 0, or --mitigate.kl_on all")
        check(self.select in ("last", "persona_keep_general"), "mitigate.select", "last or persona_keep_general",
              self.select)
        check(0 < self.select_keep <= 1, "mitigate.select_keep", "in (0, 1]", self.select_keep)
        check(self.select == "last" or bool(self.select_persona_probes), "mitigate.select_persona_probes",
              "a persona probe file when --mitigate.select is persona_keep_general", self.select_persona_probes)
        check(self.select_limit > 0, "mitigate.select_limit", "> 0", self.select_limit)

    @property
    def active(self) -> bool:
        """Whether any option changes training (the default changes nothing)."""
        return self.replay > 0 or self.kl > 0 or self.select != "last"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 decodes greedily (the default); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass (sampling only)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: no limit; sampling only)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens."""
    seed: int = 0
    """Sampling seed, so sampled answers can be reproduced."""

    def __post_init__(self) -> None:
        # The verbs take it as `gen` (`tunelab chat --gen.temperature 0.7`).
        check(self.max_new_tokens > 0, "gen.max_new_tokens", "> 0", self.max_new_tokens)
        check(math.isfinite(self.temperature) and self.temperature >= 0, "gen.temperature", ">= 0",
              self.temperature)
        check(0 < self.top_p <= 1, "gen.top_p", "in (0, 1]", self.top_p)
        check(self.top_k >= 0, "gen.top_k", ">= 0", self.top_k)
        check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "gen.repetition_penalty",
              "> 0", self.repetition_penalty)
        check(self.seed >= 0, "gen.seed", ">= 0", self.seed)


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested) -> plain dicts, for YAML and JSON."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, values: dict) -> Any:
    """Plain dict -> dataclass `cls`, recursing into dataclass fields; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; accepted: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        kwargs[name] = value
    return cls(**kwargs)


__all__ = ["ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "MitigateConfig", "GenerationConfig",
           "to_dict", "from_dict", "asdict", "check"]
