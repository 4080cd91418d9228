"""LoRA (and its variants as options): low-rank updates on the chosen linear layers.

Defaults are the reference recipe's: r 8, alpha 32, dropout 0.1 on the attention and
MLP projections.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Union

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import check
from .peft_common import load_peft, save_peft
from .registry import Capabilities, Method, register

# PiSSA and OLoRA move part of each weight into the adapter and leave the rest in the base
# (changed in memory). Their initial adapter is kept here so `save` can express the trained
# adapter against the untouched base, as a plain LoRA adapter of rank 2r.
INITIAL_ADAPTER = "_tunelab_initial_adapter"
RESIDUAL_INITS = ("pissa", "olora")
"""Initialisations that move the adapter's start out of the base weights (a residual base)."""

# Projection names of the common architectures; `resolve_targets` keeps those present.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
               "dense_4h_to_h", "w1", "w2", "w3", "wq", "wk", "wv", "wo"]


@dataclass
class LowRankConfig:
    """The low-rank update LoRA and QLoRA share (QLoRA's config adds the base's 4-bit format)."""
    r: int = 8
    """Rank of the update."""
    alpha: float = 32
    """Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.1
    """Dropout on the adapter's input."""
    targets: Union[list[str], str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
    """Module names to adapt, or `all-linear`. Names absent from the architecture are dropped;
    if none is present, tunelab falls back to the architecture's projections it can find."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""

    FLAG: ClassVar[str] = "method.lora"
    """The flag prefix validation errors name (`--method.lora.r`, `--method.qlora.r`)."""

    def __post_init__(self) -> None:
        check(self.r > 0, f"{self.FLAG}.r", "> 0", self.r)
        check(self.alpha > 0, f"{self.FLAG}.alpha", "> 0", self.alpha)
        check(0 <= self.dropout < 1, f"{self.FLAG}.dropout", "in [0, 1)", self.dropout)


@dataclass
class LoraConfig(LowRankConfig):
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): better at low rank, slower."""
    init: str = "default"
    """Adapter initialisation: default (B = 0), gaussian, pissa or olora (start from the weight's
    principal / orthonormal directions; saved as a plain rank-2r LoRA of the untouched base)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.init in ("default", "gaussian", "pissa", "olora"), "method.lora.init",
              "one of default, gaussian, pissa, olora", self.init)


def resolve_targets(model: torch.nn.Module, targets: Union[list[str], str]) -> Union[list[str], str]:
    import torch

    if targets == "all-linear" or targets == ["all-linear"]:
        return "all-linear"
    if isinstance(targets, str):
        targets = [targets]
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    chosen = [t for t in targets if t in present]
    if not chosen:
        chosen = [t for t in PROJECTIONS if t in present]
    if not chosen:
        raise ValueError(f"`--method.lora.targets` {targets} match no linear layer of this model; "
                         f"its linear layers are named {sorted(present)[:20]}")
    return chosen


def peft_config(model: torch.nn.Module, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.init]
    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg.targets), use_dora=cfg.dora,
        use_rslora=cfg.rslora, init_lora_weights=init, task_type="CAUSAL_LM")


def apply(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    from peft import get_peft_model, get_peft_model_state_dict

    net = get_peft_model(model, peft_config(model, cfg))
    if cfg.init in RESIDUAL_INITS:
        setattr(net, INITIAL_ADAPTER, {k: v.detach().clone() for k, v in get_peft_model_state_dict(net).items()})
    return net


def save(model: torch.nn.Module, directory: Path) -> None:
    initial = model.__dict__.get(INITIAL_ADAPTER)
    if initial is None:
        return save_peft(model, directory)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "initial"
        start.mkdir()
        save_file({k: v.contiguous() for k, v in initial.items()}, str(start / "adapter_model.safetensors"))
        model.save_pretrained(str(directory), safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(start))


def resume(base: torch.nn.Module, directory: Path, cfg: LoraConfig) -> torch.nn.Module:
    """PiSSA and OLoRA train an adapter on a residual of the base that their initialisation
    computes (deterministically, from the base's weights): that is redone, and the
    checkpoint's own adapter (saved unconverted by `save_peft`) set into it. The converted
    final adapter is a different, rank-2r one relative to the original base."""
    if cfg.init not in RESIDUAL_INITS:
        return load_peft(base, directory, True)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    net = apply(base, cfg)
    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(net, saved)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: adapter tensors the model does not have: {result.unexpected_keys[:5]}")
    return net


register(Method(
    name="lora", config_cls=LoraConfig,
    capabilities=Capabilities(mergeable=True, supports_packing=True, peft_type="LORA", shardable=True),
    apply=apply, save=save, load=load_peft, checkpoint=save_peft, resume=resume,
    summary="low-rank updates on linear layers (DoRA, rsLoRA, PiSSA/OLoRA init as options)"))
