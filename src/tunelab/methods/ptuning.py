"""P-Tuning: trained virtual tokens before every input, produced by a small prompt encoder.

Defaults are the reference recipe's: PEFT's PromptEncoder, 10 virtual tokens, MLP
reparameterization with hidden size 1024, dropout 0.1 (an LSTM encoder is an option).
The adapter is not a weight change, so it cannot be merged. It trains on packed rows:
each row of a pack starts with its own virtual tokens (`accel.loss.with_prompt`), the
layout PEFT gives a padded row. Shared machinery (generation
that injects the tokens, the guard against model-specific helpers, resumable saves) is
in `virtual_tokens.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import check
from .peft_common import apply_virtual, load_virtual, save_virtual
from .registry import Capabilities, Method, refuse_merge, register


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = 10
    """Virtual tokens placed before every input."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """How the virtual tokens are reparameterized: a 3-layer MLP, or a bidirectional LSTM + MLP."""
    encoder_hidden_size: int = 1024
    """Hidden size of the prompt encoder."""
    encoder_dropout: float = 0.1
    """Dropout between LSTM layers (PEFT's MLP encoder has no dropout layer)."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has three linear layers)."""

    def __post_init__(self) -> None:
        check(self.num_virtual_tokens > 0, "method.ptuning.num_virtual_tokens", "> 0", self.num_virtual_tokens)
        check(self.encoder in ("mlp", "lstm"), "method.ptuning.encoder", "mlp or lstm", self.encoder)
        check(self.encoder_hidden_size > 0, "method.ptuning.encoder_hidden_size", "> 0", self.encoder_hidden_size)
        check(0 <= self.encoder_dropout < 1, "method.ptuning.encoder_dropout", "in [0, 1)", self.encoder_dropout)
        check(self.encoder_num_layers > 0, "method.ptuning.encoder_num_layers", "> 0", self.encoder_num_layers)


def peft_config(cfg: PTuningConfig):
    from peft import PromptEncoderConfig

    options = dict(num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size,
                   encoder_reparameterization_type=cfg.encoder.upper(), encoder_dropout=cfg.encoder_dropout,
                   task_type="CAUSAL_LM")
    if cfg.encoder == "lstm":  # PEFT warns when the MLP is given a layer count it ignores
        options["encoder_num_layers"] = cfg.encoder_num_layers
    return PromptEncoderConfig(**options)


def apply(model: torch.nn.Module, cfg: PTuningConfig) -> torch.nn.Module:
    return apply_virtual(model, peft_config(cfg))


NOT_MERGEABLE = (
    "P-Tuning adds virtual tokens to every input; it changes no weight of the base model, so "
    "there is nothing to merge into it. Serve the base with the adapter (`tunelab chat --run "
    "RUN`, evaluation and serving load it), or train with `--method.name lora` if you need one "
    "merged model")

register(Method(
    name="ptuning", config_cls=PTuningConfig,
    capabilities=Capabilities(mergeable=False, supports_packing=True, adapter_kind="input_embeddings"),
    apply=apply, save=save_virtual, load=load_virtual, merge=refuse_merge("ptuning", NOT_MERGEABLE),
    summary="P-Tuning: virtual tokens from a trained MLP/LSTM prompt encoder (not mergeable)"))
