"""Prefix tuning: trained keys and values placed before the input in every attention layer.

More capacity than prompt tuning at the same number of virtual tokens (each layer gets its
own), still no change to any weight: not mergeable, no packing. With `projection` the
prefix is produced by a 2-layer MLP (Li & Liang 2021), which trains more stably and is
saved so training can continue. Shared machinery is in `virtual_tokens.py`.

The prefix starts as the keys and values the base itself computes for a few real tokens
(`init: activations`, as Li & Liang found best), not PEFT's N(0, 1) embedding: random keys
and values in every layer, attended by every query, cost the model more than a short
training run wins back: PEFT's init left the held-out loss above the base's after a short
run (bench/learning_matrix.py; docs/PERFORMANCE.md).
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
    init: str = "activations"
    """Starting prefix: `activations` (the base's own keys and values for the first
    `num_virtual_tokens` positions of a neutral input: the model starts close to the base)
    or `random` (PEFT's N(0, 1) embedding). With `projection` the MLP starts as PEFT makes it."""

    def __post_init__(self) -> None:
        check(self.init in ("activations", "random"), "method.prefix.init", "activations or random", self.init)
        check(self.num_virtual_tokens > 0, "method.prefix.num_virtual_tokens", "> 0", self.num_virtual_tokens)
        check(self.encoder_hidden_size > 0, "method.prefix.encoder_hidden_size", "> 0", self.encoder_hidden_size)


def apply(model: torch.nn.Module, cfg: PrefixConfig) -> torch.nn.Module:
    from peft import PrefixTuningConfig

    net = apply_virtual(model, PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.encoder_hidden_size, task_type="CAUSAL_LM"))
    if cfg.init == "activations" and not cfg.projection:
        start_from_activations(net)
    return net


def start_from_activations(net) -> None:
    """Set the prefix embedding to the keys and values the base computes for `n` copies of
    its first special token (bos, else pad, else 0) at positions 0..n-1, in PEFT's layout:
    row j = [layer 0 keys, layer 0 values, layer 1 keys, ...] of position j, heads first."""
    import torch

    config = net.active_peft_config
    embedding = net.prompt_encoder[net.active_adapter].embedding.weight
    base = net.get_base_model()
    token = next((t for t in (base.config.bos_token_id, base.config.pad_token_id) if isinstance(t, int)), 0)
    ids = torch.full((1, config.num_virtual_tokens), token, dtype=torch.long, device=embedding.device)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            cache = base(input_ids=ids, use_cache=True).past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            # [layers, 2, 1, heads, n, dim] -> [n, layers * 2 * heads * dim]
            stacked = torch.stack([torch.stack(kv) for kv in layers])[:, :, 0]
            rows = stacked.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1)
            if rows.shape != embedding.shape:
                raise ValueError(f"prefix init: the base's cache gives {tuple(rows.shape)}, PEFT's prefix "
                                 f"is {tuple(embedding.shape)}; use --method.prefix.init random")
            embedding.copy_(rows.to(embedding.dtype))
    finally:
        base.train(was_training)


register(Method(
    name="prefix", config_cls=PrefixConfig,
    capabilities=Capabilities(mergeable=False, supports_packing=False, adapter_kind="kv_prefix",
                              supports_checkpointing=False),
    apply=apply, save=save_virtual, load=load_virtual,
    merge=refuse_merge("prefix", (
        "prefix tuning adds trained keys and values to every attention layer; it changes no weight "
        "of the base model, so there is nothing to merge. Use the base with the adapter, or train "
        "with `--method.name lora` if you need one merged model")),
    summary="prefix tuning: trained keys/values before the input in every layer (not mergeable)"))
