"""Fused Triton kernels for RMSNorm, RoPE and SwiGLU from liger-kernel, for one training run.

Eager PyTorch runs a decoder layer's RMSNorm as eight kernels forward and a dozen backward,
RoPE as a dozen, SwiGLU as five: on a packed LoRA step of a few thousand tokens those small
kernels, not the matmuls, set the speed. liger-kernel (the optional extra `tunelab[liger]`)
has one Triton kernel for each, forward and backward; they run inside tunelab's CUDA graphs
like any other kernel and need no compilation step (the gain: docs/PERFORMANCE.md).

liger applies itself by patching the model instance (its norms and MLPs) and the model's
modeling module (RoPE is a module-level function there, and the norm and MLP classes are
swapped for any model built later). `liger(...)` keeps the instance patches for the run and
puts the modeling module's globals back when the run ends, so a model loaded afterwards in
the same process (evaluation, merging, on any device) is plain transformers again.
Norms whose weight is frozen (every PEFT method) run `kernels/rms_norm.py`'s kernels instead of
liger's: the same arithmetic, no weight gradient, a program a row.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch

from ..config import ConfigError
from .kernels import rms_norm

EXTRA = "pip install 'tunelab[liger]'"


def liger_function(model: torch.nn.Module):
    """liger's `apply_liger_kernel_to_<type>` for this model's type, or None (not installed,
    or a model type liger does not cover)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(getattr(model.config, "model_type", None))


def wanted(choice: str, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `--train.kernels CHOICE` means liger for this model on this device; `liger`
    where it cannot run raises a ConfigError that says why."""
    if choice == "torch":
        return False
    apply = liger_function(model)
    if choice == "auto":
        return apply is not None and device.type == "cuda"
    if device.type != "cuda":
        raise ConfigError("`--train.kernels liger` needs a CUDA GPU (Triton kernels); use auto or torch")
    if apply is None:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise ConfigError(f"`--train.kernels liger` needs liger-kernel: {EXTRA}") from None
        raise ConfigError(f"`--train.kernels liger`: liger-kernel has no kernels for model type "
                          f"{model.config.model_type!r}; use auto or torch")
    return True


@contextmanager
def module_globals_restored(module):
    """Whatever `module`'s globals are changed to inside the block, they are put back after."""
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name in [n for n in vars(module) if n not in saved]:
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


@contextmanager
def liger(model: torch.nn.Module, choice: str, device: torch.device, fast_norm: bool = True):
    """Within the block, `model` (a transformers model, not a PEFT wrapper) runs liger's
    RMSNorm, RoPE and SwiGLU when `choice` asks for them (`wanted`); yields whether it does.
    `fast_norm` (`Levers.triton_rms_norm`): frozen norms through `kernels.rms_norm`."""
    if not wanted(choice, model, device):
        yield False
        return
    apply = liger_function(model)
    options = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    accepted = inspect.signature(apply).parameters
    with module_globals_restored(sys.modules[type(model).__module__]):
        apply(model=model, **{k: v for k, v in options.items() if k in accepted})
        with rms_norm.fast_norms(model, fast_norm):  # liger's norm backward, without the weight gradient, faster
            yield True
