"""Freeze tuning: train only the last N decoder layers, everything else frozen.

A middle ground between adapters and full fine-tuning: real weights change (so the result
merges trivially: the model with those layers replaced), memory grows with N. It needs a
decoder whose layers are `model.model.layers` (Qwen2, Llama, Mistral, ... style). The save
holds only the trained layers (`freeze.safetensors`) and which they are (`freeze.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import ConfigError, check
from .registry import Capabilities, Method, model_device, register

WEIGHTS_FILE = "freeze.safetensors"
INDEX_FILE = "freeze.json"


@dataclass
class FreezeConfig:
    layers: int = 2
    """Train the last N decoder layers."""

    def __post_init__(self) -> None:
        check(self.layers > 0, "method.freeze.layers", "> 0", self.layers)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"`--method.name freeze` needs a decoder whose layers are `model.model.layers` "
                          f"(Qwen2/Llama-style); {type(model).__name__} has none. Use --method.name lora "
                          f"or --method.name full")
    return layers


def apply(model: torch.nn.Module, cfg: FreezeConfig) -> torch.nn.Module:
    layers = decoder_layers(model)
    check(cfg.layers <= len(layers), "method.freeze.layers", f"at most the model's {len(layers)} layers",
          cfg.layers)
    model.requires_grad_(False)
    for layer in layers[len(layers) - cfg.layers:]:
        layer.requires_grad_(True)
    return model


def save(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    layers = decoder_layers(model)
    trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    if not trained:
        raise ValueError("nothing to save: no decoder layer is trainable (was the model loaded for inference?)")
    state = {f"{i}.{name}": tensor.detach().cpu().contiguous()
             for i in trained for name, tensor in layers[i].state_dict().items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(directory) / WEIGHTS_FILE))
    (Path(directory) / INDEX_FILE).write_text(json.dumps({"layers": trained, "num_layers": len(layers)}))


def load(base: torch.nn.Module, directory: Path, trainable: bool = False) -> torch.nn.Module:
    from safetensors.torch import load_file

    layers = decoder_layers(base)
    index = json.loads((Path(directory) / INDEX_FILE).read_text())
    if index["num_layers"] != len(layers):
        raise ValueError(f"{directory} was trained on a model with {index['num_layers']} layers; this base "
                         f"has {len(layers)}")
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(model_device(base)))
    base.requires_grad_(False)
    for i in index["layers"]:
        prefix = f"{i}."
        layers[i].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                  strict=True)
        layers[i].requires_grad_(trainable)
    return base


register(Method(
    name="freeze", config_cls=FreezeConfig,
    capabilities=Capabilities(mergeable=True, supports_packing=True, adapter_kind="whole_model",
                              shardable=True),
    apply=apply, save=save, load=load, merge=lambda model: model,
    summary="freeze tuning: train only the last N decoder layers (merged by definition)"))
