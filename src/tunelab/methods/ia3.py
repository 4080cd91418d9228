"""IA3: learned vectors that rescale keys, values and the MLP's inner activations.

(Liu et al. 2022, "(IA)^3".) Far fewer parameters than LoRA (one vector per adapted layer,
about 0.01% of the model), initialised to ones so training starts from the base model.
Its scales fold into the weights: mergeable, and it trains on packed rows. It usually
wants a higher learning rate than LoRA (around 3e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import ConfigError, check
from .peft_common import load_peft, save_peft
from .registry import Capabilities, Method, register


@dataclass
class IA3Config:
    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Linear layers to rescale; names absent from the architecture are dropped."""
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    """Those of `targets` that are MLP layers: their input is rescaled, not their output."""

    def __post_init__(self) -> None:
        check(len(self.targets) > 0, "method.ia3.targets", "a non-empty list of module names", self.targets)


def peft_config(model: torch.nn.Module, cfg: IA3Config):
    import torch

    from peft import IA3Config as PeftIA3Config

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    targets = [t for t in cfg.targets if t in present]
    if not targets:
        raise ConfigError(f"`--method.ia3.targets` {cfg.targets} match no linear layer of this model; "
                          f"its linear layers are named {sorted(present)[:20]}")
    return PeftIA3Config(target_modules=targets, feedforward_modules=[f for f in cfg.feedforward if f in targets],
                         task_type="CAUSAL_LM")


def apply(model: torch.nn.Module, cfg: IA3Config) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, cfg))


register(Method(
    name="ia3", config_cls=IA3Config,
    capabilities=Capabilities(mergeable=True, supports_packing=True, peft_type="IA3"),
    apply=apply, save=save_peft, load=load_peft,
    summary="IA3: learned rescaling of keys, values and MLP activations (tiny, mergeable)"))
