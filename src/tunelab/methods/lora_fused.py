"""LoRA's training forward and backward in as few kernels as the math allows.

PEFT's `lora.Linear.forward` is written for every case (several adapters, variants, mixed
batches) and, for the common one, runs about a dozen small operations per projection and
twice as many in autograd's backward: the input upcast to the adapter's fp32, dropout, the
weights cast down again by autocast, two matmuls, a scale and an add. On a packed step of a
few thousand tokens those kernels, not the matmuls, set the speed (docs/PERFORMANCE.md).

`fuse(model)` gives every plain LoRA projection (one active adapter, no DoRA or other
variant, a `torch.nn.Linear` base) a forward through `_LoraLinear`, which computes

    y = x W^T + b + scale * (dropout(x) A^T) B^T

with dropout's mask drawn once (`torch.native_dropout`, as `nn.Dropout` does), the adapter
product added by the same matmul that computes it (`addmm`), and a hand-written backward:
x's gradient in one `addmm`, A's and B's in one matmul each. The adapter weights stay where
PEFT keeps them (fp32 on a half-precision base, so the optimizer updates fp32 weights); they
are cast to the compute dtype once a forward, as autocast would. Saving, loading and merging
are PEFT's, untouched: only `forward` changes, and only while the layer is in its plain
state (with or without gradients: held-out losses use it too); anything else (adapters
disabled or merged, several adapters, mixed-batch `adapter_names`) goes through PEFT's own
forward.
"""

from __future__ import annotations

import types

import torch


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float):
        dtype = weight.dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        if p > 0:
            dropped, mask = torch.native_dropout(rows, p, True)
        else:
            dropped, mask = rows, None
        low = dropped @ a.t()
        out = rows @ weight.t() if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
        out.addmm_(low, b.t(), alpha=scale)
        ctx.save_for_backward(weight, dropped, mask, low, a, b)
        ctx.scale, ctx.p, ctx.x_dtype, ctx.x_shape, ctx.has_bias = scale, p, x.dtype, x.shape, bias is not None
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, dropped, mask, low, a, b = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        grad = grad.reshape(-1, weight.shape[0]).to(weight.dtype)
        grad_low = grad @ (b * scale)
        grad_b = torch.mm(grad.t(), low).mul_(scale).to(ctx.adapter_dtypes[1])
        grad_a = torch.mm(grad_low.t(), dropped).to(ctx.adapter_dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            back = grad_low @ a
            if mask is not None:
                back = torch.ops.aten.native_dropout_backward(back, mask, 1.0 / (1.0 - p))
            grad_x = back.addmm_(grad, weight).to(ctx.x_dtype).view(ctx.x_shape)
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _plain(layer) -> str | None:
    """The one active adapter of a LoRA layer in its plain training state, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain(self) if not args and not kwargs else None
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    base = self.base_layer
    with torch.autocast(x.device.type, enabled=False):
        out = _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                float(self.scaling[name]), float(p))
    return out


def fusable(layer) -> bool:
    """A PEFT LoRA `Linear` over a plain `torch.nn.Linear` whose dropout is plain dropout."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or type(layer.base_layer) is not torch.nn.Linear:
        return False
    return all(isinstance(d, (torch.nn.Dropout, torch.nn.Identity)) for d in layer.lora_dropout.values())


def fuse(model: torch.nn.Module) -> int:
    """Route every fusable LoRA projection of `model` through `_LoraLinear`; returns how many."""
    count = 0
    for layer in model.modules():
        if fusable(layer) and not hasattr(layer, "_peft_forward"):
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
            count += 1
    return count


def unfuse(model: torch.nn.Module) -> None:
    """Give every layer `fuse` changed its PEFT forward back."""
    for layer in model.modules():
        if hasattr(layer, "_peft_forward"):
            layer.forward = layer._peft_forward
            del layer._peft_forward
