"""Prompt tuning: trained virtual-token embeddings before every input, nothing else.

The simplest virtual-token method (Lester et al. 2021): the embeddings themselves are the
parameters (20 virtual tokens by default, initialised from randomly sampled vocabulary
embeddings). Not mergeable; trains on packed rows like P-Tuning; see `virtual_tokens.py` for what it shares with
P-Tuning.
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
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    """Virtual tokens placed before every input."""
    init: Literal["sample_vocab", "random"] = "sample_vocab"
    """Start from the embeddings of randomly drawn vocabulary tokens (stabler), or random vectors."""

    def __post_init__(self) -> None:
        check(self.num_virtual_tokens > 0, "method.prompt_tuning.num_virtual_tokens", "> 0",
              self.num_virtual_tokens)
        check(self.init in ("sample_vocab", "random"), "method.prompt_tuning.init",
              "sample_vocab or random", self.init)


def apply(model: torch.nn.Module, cfg: PromptTuningConfig) -> torch.nn.Module:
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    return apply_virtual(model, PeftPromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=cfg.init.upper(), task_type="CAUSAL_LM"))


register(Method(
    name="prompt_tuning", config_cls=PromptTuningConfig,
    capabilities=Capabilities(mergeable=False, supports_packing=True, adapter_kind="input_embeddings"),
    apply=apply, save=save_virtual, load=load_virtual,
    merge=refuse_merge("prompt_tuning", (
        "prompt tuning adds trained virtual tokens to every input; it changes no weight of the base "
        "model, so there is nothing to merge. Use the base with the adapter, or train with "
        "`--method.name lora` if you need one merged model")),
    summary="prompt tuning: trained virtual-token embeddings before every input (not mergeable)"))
