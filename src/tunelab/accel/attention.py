"""Padding-free attention for training: every packed row attends only to itself.

`collate.pack_batch` (through `data.packing.packed_inputs`) concatenates a micro-batch's rows
into one sequence with position_ids restarting per row. `varlen_attention`, registered with
transformers' `AttentionInterface` as `tunelab_varlen`, keeps every row to itself by handing
the row boundaries (cu_seqlens) to `torch.nn.attention.varlen.varlen_attn` (FlashAttention):
no mask, no padding, no attention across rows. Plain SDPA on a packed sequence would attend
across rows, and masked bf16 SDPA backward has produced NaN gradients, so neither is used.
Padded batches (methods that cannot pack) go through the same kernel after the padding is
dropped. Where FlashAttention cannot run (CPU, fp32) each row goes through causal SDPA on
its own: slow, exact, used by the tests.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

ATTENTION = "tunelab_varlen"
"""`varlen_attention` for packed batches: no mask is built at all (the rows' boundaries
come as keyword arguments)."""
ATTENTION_PADDED = "tunelab_varlen_padded"
"""`varlen_attention` for padded batches: transformers hands it the 2D padding mask."""


def _varlen_kernel():
    """torch's varlen FlashAttention and how this torch version spells causal and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


_VARLEN = _varlen_kernel()



class _FlashGQA(torch.autograd.Function):
    """Causal varlen FlashAttention with fewer key/value heads than query heads, through
    aten's FlashAttention ops, which take them as they are (FlashAttention sums the key and
    value gradients of each group itself). torch's `varlen_attn` before `enable_gqa` only
    passes equal head counts, so keys and values were repeated to every query head: a copy
    of each forward and a sum of each backward (what that cost: docs/PERFORMANCE.md)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, longest: int, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.longest, ctx.scale = longest, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.longest, ctx.longest, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention varlen runs here (CUDA, fp16/bf16, torch with `varlen_attn`)."""
    return _VARLEN is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    longest: int, scale: float | None, flash_gqa: bool = True) -> torch.Tensor:
    """Causal attention within each segment of packed [T, heads, dim] tensors.

    Segment i is rows cu_seqlens[i]:cu_seqlens[i+1]; no query sees a key of another segment.
    `flash_gqa` (`Levers.flash_gqa`): grouped-query attention (fewer key/value heads) straight
    through FlashAttention's own kernels where torch's `varlen_attn` has no `enable_gqa`; off:
    keys and values repeated to every query head first.
    """
    if varlen_available(q.device, q.dtype):
        kernel, causal, native_gqa = _VARLEN
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if k.shape[1] != q.shape[1] and not native_gqa and flash_gqa:
            return _FlashGQA.apply(q, k, v, cu, int(longest), scale)
        if k.shape[1] != q.shape[1] and not native_gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = {"enable_gqa": True} if native_gqa and k.shape[1] != q.shape[1] else {}
        return kernel(q, k, v, cu, cu, int(longest), int(longest), scale=scale, **causal, **extra)
    # Exact fallback: one causal SDPA per segment (no mask tensor, so no masked backward).
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                        scale=scale).transpose(0, 1)
    return out


_UNPADDING: list = [None, None]  # [mask, (keep, cu_seqlens, longest)] of the last forward


def _unpadding(mask: torch.Tensor):
    """(kept token indices, cu_seqlens, longest row) of a 2D padding mask. Every layer gets the
    same mask tensor, so it is worked out once a forward: each time is a device sync."""
    if _UNPADDING[0] is not mask:
        mask_bool = mask.bool()
        lengths = mask_bool.sum(1, dtype=torch.int32)
        _UNPADDING[:] = [mask, (mask_bool.flatten().nonzero().squeeze(1),
                                F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max()))]
    return _UNPADDING[1]


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                     flash_gqa: bool = True, **kwargs):
    """transformers attention function: query/key/value [batch, heads, len, dim] -> [batch, len, heads, dim].

    Row boundaries come from `cu_seq_lens_q` / `max_length_q` (a packed [1, T] batch), or
    from a 2D padding mask (padding dropped, then put back as zeros), or else every batch
    row is one sequence.
    """
    if dropout:
        raise NotImplementedError(f"{ATTENTION}: attention dropout {dropout} is not supported")
    if softcap is not None:
        raise NotImplementedError(f"{ATTENTION}: attention logit softcapping is not supported")
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError(f"{ATTENTION} is for training: queries and keys must be the "
                                  f"same tokens (no cache), got {length} and {key.shape[2]}")
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    keep = None
    if cu_seq_lens_q is not None:
        cu_seqlens, longest = cu_seq_lens_q, max_length_q
    elif attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(f"{ATTENTION} takes a 2D padding mask, got {attention_mask.dim()}D")
        if attention_mask.shape[1] != length:
            raise NotImplementedError(f"{ATTENTION}: a padding mask of {attention_mask.shape[1]} "
                                      f"positions for {length} tokens")
        keep, cu_seqlens, longest = _unpadding(attention_mask)
        q, k, v = q[keep], k[keep], v[keep]
    else:
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)
        longest = length
    if sliding_window is not None and longest > sliding_window:
        raise NotImplementedError(f"{ATTENTION}: rows of {longest} tokens exceed the sliding window "
                                  f"{sliding_window}")
    out = attend_segments(q, k, v, cu_seqlens, longest, scaling, flash_gqa)
    if keep is not None:
        full = out.new_zeros(batch * length, heads, dim)
        full[keep] = out
        out = full
    return out.view(batch, length, heads, dim), None


def register_attention(flash_gqa: bool = True) -> None:
    """Make both `varlen_attention` names known to transformers (idempotent); `flash_gqa` as
    in `attend_segments`."""
    # transformers (and peft) load where accel/ first needs them, so the kernels in accel/kernels/
    # import with torch alone (the interpreter tests start a process for each)
    from transformers import AttentionInterface

    attend = varlen_attention if flash_gqa else functools.partial(varlen_attention, flash_gqa=False)
    AttentionInterface.register(ATTENTION, attend)
    AttentionInterface.register(ATTENTION_PADDED, attend)
    try:  # the padding mask must reach the attention function as a 2D tensor, as for FA2
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

        AttentionMaskInterface.register(ATTENTION_PADDED, flash_attention_mask)
    except ImportError:
        pass


def use_varlen_attention(model: torch.nn.Module, padded: bool = False, flash_gqa: bool = True) -> None:
    """Switch `model` (and every sub-model) to `varlen_attention`, for packed or padded batches."""
    register_attention(flash_gqa)
    set_attention(model, ATTENTION_PADDED if padded else ATTENTION)


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Set transformers' attention implementation of `model` and every sub-model to `name`."""
    try:
        model.set_attn_implementation(name)
        if all(getattr(m.config, "_attn_implementation", name) == name
               for m in model.modules() if hasattr(m, "config")):
            return
    except (AttributeError, KeyError, ValueError):
        pass
    for module in model.modules():  # older transformers: set the config attribute directly
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            try:
                config._attn_implementation = name
            except AttributeError:
                config._attn_implementation_internal = name


