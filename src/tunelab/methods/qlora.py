"""QLoRA: LoRA on a base whose linear layers are quantized to 4 bits (bitsandbytes NF4).

(Dettmers et al. 2023.) The frozen base takes about a quarter of its bf16 memory; the LoRA
matrices train in full precision on top. It needs a CUDA GPU (bitsandbytes' 4-bit kernels).

tunelab loads the base in bf16 and `apply` quantizes it in place: every `nn.Linear` except
the output layer becomes a bitsandbytes `Linear4bit`, so nothing outside this module has to
know about quantization. The saved adapter is an ordinary LoRA adapter. `merge` folds it
into the dequantized base, the weights the adapter was trained against, and returns a plain
bf16 model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.

from ..config import ConfigError, check
from . import lora
from .peft_common import save_peft
from .registry import Capabilities, Method, model_device, register


@dataclass
class QLoraConfig(lora.LowRankConfig):
    """LoRA's low-rank update (r, alpha, dropout, targets, rslora) on a 4-bit base."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit format of the base weights: NF4 (normal-float, QLoRA's) or FP4."""
    double_quant: bool = True
    """Quantize the quantization scales too (saves about 0.4 bit a parameter)."""

    FLAG: ClassVar[str] = "method.qlora"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.quant_type in ("nf4", "fp4"), "method.qlora.quant_type", "nf4 or fp4", self.quant_type)

    def as_lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                               rslora=self.rslora)


def require_cuda(model: torch.nn.Module):
    """bitsandbytes, or a ConfigError saying what to do on this machine."""
    device = model_device(model)
    if device.type != "cuda":
        raise ConfigError(
            f"`--method.name qlora` needs a CUDA GPU (bitsandbytes' 4-bit kernels), but the model is on "
            f"{device.type}. Here, train with `--method.name lora` (the same adapter on a full-precision "
            f"base); for QLoRA, run on a machine with an NVIDIA GPU and `pip install 'tunelab[qlora]'`")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("`--method.name qlora` needs bitsandbytes: pip install 'tunelab[qlora]'") from None
    return bitsandbytes


def quantize(model: torch.nn.Module, cfg: QLoraConfig) -> torch.nn.Module:
    """Replace every linear layer but the output layer with a 4-bit one, in place."""
    import torch

    bnb = require_cuda(model)
    device = model_device(model)
    head = model.get_output_embeddings()
    compute = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute, compress_statistics=cfg.double_quant,
                                      quant_type=cfg.quant_type, device="meta")
            layer._parameters["weight"] = bnb.nn.Params4bit(  # quantized when moved to the GPU
                child.weight.data, requires_grad=False, compress_statistics=cfg.double_quant,
                quant_type=cfg.quant_type).to(device)
            layer.quant_state = layer.weight.quant_state  # newer bitsandbytes reads it from the module
            if child.bias is not None:
                layer._parameters["bias"] = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # PEFT then wraps these layers with its 4-bit LoRA layer
    torch.cuda.empty_cache()
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state") for m in model.modules())


def apply(model: torch.nn.Module, cfg: QLoraConfig) -> torch.nn.Module:
    from peft import get_peft_model

    if not is_quantized(model):
        quantize(model, cfg)
    model.requires_grad_(False)
    return get_peft_model(model, lora.peft_config(model, cfg.as_lora()))


QUANT_FILE = "qlora.json"
"""How the base was quantized in training, so loading quantizes it the same way."""


def save(model: torch.nn.Module, directory) -> None:
    save_peft(model, directory)
    weight = next(m.weight for m in model.modules() if type(m).__name__ == "Linear4bit")
    (Path(directory) / QUANT_FILE).write_text(json.dumps(
        {"quant_type": weight.quant_type, "double_quant": bool(weight.compress_statistics)}))


def load(base: torch.nn.Module, directory, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    if not trainable and model_device(base).type != "cuda":
        # The adapter is a plain LoRA adapter: on a machine without a GPU, use it on the
        # full-precision base rather than refuse (chat, eval, merge still work).
        warnings.warn("no CUDA GPU: the QLoRA adapter is applied to the full-precision base, not "
                      "the 4-bit one it was trained on; answers can differ slightly")
        return PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    if not is_quantized(base):
        marker = Path(directory) / QUANT_FILE
        quantize(base, QLoraConfig(**json.loads(marker.read_text())) if marker.is_file() else QLoraConfig())
    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model: each adapted layer becomes dequantized base + LoRA update, each other
    4-bit layer its dequantized weight."""
    import torch

    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    dtype = base.get_input_embeddings().weight.dtype

    def plain(weight: torch.Tensor, bias) -> torch.nn.Linear:
        out_features, in_features = weight.shape
        linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias.data)
        return linear.requires_grad_(False)

    def dequantized(layer) -> torch.Tensor:
        if not hasattr(layer.weight, "quant_state"):
            return layer.weight.data.float()
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()

    replaced = []
    with torch.no_grad():
        for name, module in list(base.named_modules()):
            if any(name.startswith(done + ".") for done in replaced):
                continue  # inside an adapted layer already replaced
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                weight = dequantized(layer)
                for adapter in module.active_adapters:
                    weight += module.get_delta_weight(adapter).float()
                new = plain(weight, layer.bias)
            elif type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state"):
                new = plain(dequantized(module), module.bias)
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, new)
            replaced.append(name)
    base.is_loaded_in_4bit = False
    if "peft_config" in base.__dict__:  # as merge_and_unload leaves it: a plain model
        del base.peft_config
    return base


register(Method(
    name="qlora", config_cls=QLoraConfig,
    capabilities=Capabilities(mergeable=True, supports_packing=True, needs_gpu=True, peft_type="LORA"),
    apply=apply, save=save, load=load, merge=merge,
    summary="QLoRA: LoRA on a 4-bit (NF4) base; needs a CUDA GPU and bitsandbytes"))
