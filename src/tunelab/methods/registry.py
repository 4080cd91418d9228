"""The method registry: a method is a name, a config dataclass, capabilities and hooks.

A method module builds a `Method` and calls `register`; adding a method touches that
module, one import line in `methods/__init__.py` and one row of the contract tests.
Code outside `methods/` asks capabilities (`mergeable`, `supports_packing`, `needs_gpu`,
`shardable`) and calls hooks (`apply`, `save`, `load`, `merge`), never compares names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.


class NotMergeable(RuntimeError):
    """The method's weights cannot be folded into the base; the message says what to do instead."""


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool
    """The adapter folds into the base weights (`tunelab merge`)."""
    supports_packing: bool
    """Trains on padding-free packed rows (virtual-token methods need one row per sequence)."""
    needs_gpu: bool = False
    """Cannot run on a CPU (e.g. 4-bit bitsandbytes kernels)."""
    adapter_kind: str = "weight_delta"
    """Where the trained weights act, which decides what can share one base in memory
    (`generate.Engine`, `evaluate.runner.engine_groups`): `weight_delta` (PEFT layers inside the
    base's modules: the LoRA family, IA3), `input_embeddings` (virtual tokens placed before
    the prompt: P-Tuning, prompt tuning), `kv_prefix` (keys and values before the input in
    every layer: prefix tuning) or `whole_model` (the base's own weights replaced: freeze, full)."""
    supports_checkpointing: bool = True
    """Trains with activation checkpointing (`--train.gradient_checkpointing`); PEFT's prefix
    tuning refuses it (its prefix is a cache the recomputation cannot replay)."""
    shardable: bool = False
    """Trains with its weights sharded by FSDP2 under torchrun (`--train.distributed fsdp`,
    fsdp.py): the base's plain linear layers and norms, with or without PEFT's LoRA layers
    inside them. Declared only where a two-process run was checked against one process
    (tests/test_distributed.py); refused elsewhere: 4-bit bitsandbytes weights (not
    DTensors), the virtual-token and prefix methods and IA3 (not built or tried)."""
    saves_frozen: bool = False
    """Its save writes frozen weights too (`full`: the whole model, frozen embeddings and all),
    so a sharded save gathers them (fsdp.gathered); otherwise they stay sharded and rank 0's
    plain copy holds stand-ins for them."""
    peft_type: str = ""
    """A weight delta's PEFT tuner type (`LORA`, `IA3`): one PEFT model switches only between
    adapters of one type, so runs of two types are evaluated on two engines."""

    def __post_init__(self) -> None:
        if self.adapter_kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter_kind must be one of {ADAPTER_KINDS}, got {self.adapter_kind!r}")
        if (self.adapter_kind == "weight_delta") != bool(self.peft_type):
            raise ValueError(f"peft_type names a weight delta's PEFT type (and only a weight delta's); "
                             f"got adapter_kind {self.adapter_kind!r} with peft_type {self.peft_type!r}")

    @property
    def shares_base(self) -> bool:
        """The saved weights sit on top of an unchanged base, so several runs can share one base
        in memory. False where training replaces base weights (full and freeze fine-tuning)."""
        return self.adapter_kind != "whole_model"


ADAPTER_KINDS = ("weight_delta", "input_embeddings", "kv_prefix", "whole_model")


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    capabilities: Capabilities
    apply: Callable[[torch.nn.Module, Any], torch.nn.Module]
    """(base model, method config) -> model whose trainable parameters are the method's."""
    save: Callable[[torch.nn.Module, Path], None]
    """Write the trained weights (safetensors) and the method's own config into a directory."""
    load: Callable[[torch.nn.Module, Path, bool], torch.nn.Module]
    """(base model, saved directory, trainable) -> model with the saved weights applied.
    With trainable=True, training continues exactly where the saved weights left off."""
    summary: str = ""
    merge: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None
    """(model from `apply`/`load`) -> plain model with the method folded into its weights,
    or raise `NotMergeable` saying why and what to do instead. Default: PEFT's
    `merge_and_unload` for mergeable methods, a refusal for the others."""

    checkpoint: Optional[Callable[[torch.nn.Module, Path], None]] = None
    """Write the weights a mid-run checkpoint needs to continue; default: `save`."""
    resume: Optional[Callable[[torch.nn.Module, Path, Any], torch.nn.Module]] = None
    """(base model, checkpoint's directory, method config) -> trainable model that continues
    from it; default: `load(base, directory, True)`."""

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            object.__setattr__(self, "checkpoint", self.save)
        if self.resume is None:
            object.__setattr__(self, "resume", lambda base, directory, cfg: self.load(base, directory, True))
        if self.merge is None:
            default = merge_and_unload if self.capabilities.mergeable else refuse_merge(self.name)
            object.__setattr__(self, "merge", default)


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Fold a PEFT weight-delta adapter (LoRA, IA3, ...) into the base; returns the base."""
    if not hasattr(model, "merge_and_unload"):
        raise NotMergeable(f"{type(model).__name__} has no adapter to merge (expected a PEFT model)")
    return model.merge_and_unload()


def refuse_merge(name: str, why: str = "") -> Callable[[torch.nn.Module], torch.nn.Module]:
    def merge(model: torch.nn.Module) -> torch.nn.Module:
        raise NotMergeable(why or f"method {name!r} does not change the base weights, so there is "
                                  f"nothing to fold into them; use the base with its adapter instead")
    return merge


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"`--method.name` must be one of {sorted(METHODS)}, got {name!r}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the values they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values packed per storage byte
            n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
