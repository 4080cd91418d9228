"""The method registry: a method is a name, a config dataclass, capabilities and hooks.

A method module builds a `Method` and calls `register`; adding a method touches that
module, one import line in `methods/__init__.py` and one row of the contract tests.
Code outside `methods/` asks capabilities (`mergeable`, `supports_packing`), never names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool
    """The adapter folds into the base weights (`tunelab merge`)."""
    supports_packing: bool
    """Trains on padding-free packed rows (virtual-token methods need one row per sequence)."""
    needs_gpu: bool = False
    """Cannot run on a CPU (e.g. 4-bit bitsandbytes kernels)."""


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
    """(base model, saved directory, trainable) -> model with the saved weights applied."""
    summary: str = ""


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
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
