"""Prefix tuning: trained keys and values placed before the input in every attention layer.

More capacity than prompt tuning at the same number of virtual tokens (each layer gets its
own), still no change to any weight: not mergeable, no packing. With `projection` the
prefix is produced by a 2-layer MLP (Li & Liang 2021), which trains more stably and is
saved so training can continue. Shared machinery is in `virtual_tokens.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import check
from .peft_common import apply_virtual, load_virtual, save_virtual
from .registry import Capabilities, Method, refuse_merge, register


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    """Virtual positions added to every layer's keys and values."""
    projection: bool = False
    """Produce the prefix with a 2-layer MLP instead of training it directly."""
    encoder_hidden_size: int = 512
    """Hidden size of the projection MLP (with `projection` only)."""

    def __post_init__(self) -> None:
        check(self.num_virtual_tokens > 0, "method.prefix.num_virtual_tokens", "> 0", self.num_virtual_tokens)
        check(self.encoder_hidden_size > 0, "method.prefix.encoder_hidden_size", "> 0", self.encoder_hidden_size)


def apply(model: torch.nn.Module, cfg: PrefixConfig) -> torch.nn.Module:
    from peft import PrefixTuningConfig

    return apply_virtual(model, PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.encoder_hidden_size, task_type="CAUSAL_LM"))


register(Method(
    name="prefix", config_cls=PrefixConfig,
    capabilities=Capabilities(mergeable=False, supports_packing=False, adapter_kind="kv_prefix"),
    apply=apply, save=save_virtual, load=load_virtual,
    merge=refuse_merge("prefix", (
        "prefix tuning adds trained keys and values to every attention layer; it changes no weight "
        "of the base model, so there is nothing to merge. Use the base with the adapter, or train "
        "with `--method.name lora` if you need one merged model")),
    summary="prefix tuning: trained keys/values before the input in every layer (not mergeable)"))
