"""Full fine-tuning: every parameter trains; the saved model is a complete model.

The most capacity and the most memory: weights, gradients and two AdamW moments of every
parameter (about 16 bytes a parameter in fp32, 8 in bf16 before activations). Use a
learning rate well below an adapter's (1e-5 rather than 1e-4). The save is a plain
Hugging Face model directory (safetensors), so "merging" is the saved model itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from .registry import Capabilities, Method, model_device, register

FROZEN_FILE = "tunelab_frozen.json"
"""Names of the parameters that did not train, so a resumed run freezes the same ones."""


@dataclass
class FullConfig:
    train_embeddings: bool = True
    """Also train the input token embeddings (and an output layer tied to them). Off saves
    their gradients and optimizer state: 1.9 GB in fp32 for Qwen2-1.5B's 151,936-id vocabulary."""


def apply(model: torch.nn.Module, cfg: FullConfig) -> torch.nn.Module:
    model.requires_grad_(True)
    if not cfg.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def save(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    (Path(directory) / FROZEN_FILE).write_text(json.dumps({"frozen": frozen}, indent=1))


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy every tensor of a saved model directory into `model`, which must match it exactly
    (a tied output layer may be absent: it is the embedding)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors weights")
    device = str(model_device(model))
    state = {}
    for file in files:
        state.update(load_file(str(file), device=device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in state if name in params}
    missing = [name for name in missing if name not in params or id(params[name]) not in loaded]
    if missing or unexpected:
        raise ValueError(f"the weights in {directory} do not fit this base model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}. Was it trained from another model?")


def load(base: torch.nn.Module, directory: Path, trainable: bool = False) -> torch.nn.Module:
    load_weights(base, directory)
    base.requires_grad_(trainable)
    marker = Path(directory) / FROZEN_FILE
    if trainable and marker.is_file():
        frozen = set(json.loads(marker.read_text())["frozen"])
        for name, param in base.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    return base


register(Method(
    name="full", config_cls=FullConfig,
    capabilities=Capabilities(mergeable=True, supports_packing=True, adapter_kind="whole_model",
                              shardable=True, saves_frozen=True),
    apply=apply, save=save, load=load, merge=lambda model: model,
    summary="full fine-tuning: every parameter trains; saves a complete model (merged by definition)"))
