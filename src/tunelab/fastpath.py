"""The fast training path: padding-free attention, and a loss computed only where it is learned.

Two levers, each exact (same per-token loss as the padded path, up to rounding):

- Packed attention. `collate.pack_batch` concatenates a micro-batch's rows into one
  sequence with position_ids restarting per row. `varlen_attention`, registered with
  transformers' `AttentionInterface` as `tunelab_varlen`, keeps every row to itself by
  handing the row boundaries (cu_seqlens) to `torch.nn.attention.varlen.varlen_attn`
  (FlashAttention): no mask, no padding, no attention across rows. Plain SDPA on a packed
  sequence would attend across rows, and masked bf16 SDPA backward has produced NaN
  gradients, so neither is used. Padded batches (methods that cannot pack) go through the
  same kernel after the padding is dropped. Where FlashAttention cannot run (CPU, fp32)
  each row goes through causal SDPA on its own: slow, exact, used by the tests.
- The loss on supervised positions only. Qwen2's vocabulary has 151,936 ids: the logits
  of every position, upcast to fp32, dwarf the rest of a LoRA step. `token_loss_sum`
  runs the model's trunk, keeps the hidden states of positions that have a label, and
  `cross_entropy.linear_cross_entropy` projects them onto the vocabulary a chunk at a
  time, computing each chunk's gradient at once so no full logits tensor is ever held.
  Models whose head is not a plain linear layer over the trunk (a softcap, a scale, a
  prompt-learning method that prepends virtual tokens) are detected by one numerical
  check at setup and keep the whole-logits loss, on supervised positions only.

`setup` decides all of it once per run (and hands packed micro-batches on CUDA to
`graphs.GraphedSteps`, which replays them as CUDA graphs); docs/PERFORMANCE.md has the
measurements behind each default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cross_entropy import linear_cross_entropy
from .data.collate import pack_batch, pad_batch, shift_labels
from .data.template import IGNORE, Rendered

ATTENTION = "tunelab_varlen"
"""`varlen_attention` for packed batches: no mask is built at all (the rows' boundaries
come as keyword arguments)."""
ATTENTION_PADDED = "tunelab_varlen_padded"
"""`varlen_attention` for padded batches: transformers hands it the 2D padding mask."""


# -- attention ------------------------------------------------------------------------------

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


FLASH_GQA = True
"""Grouped-query attention (fewer key/value heads) straight through FlashAttention's own
kernels where torch's `varlen_attn` has no `enable_gqa`; off: keys and values repeated to
every query head first (a benchmark lever)."""


class _FlashGQA(torch.autograd.Function):
    """Causal varlen FlashAttention with fewer key/value heads than query heads, through
    aten's FlashAttention ops, which take them as they are (FlashAttention sums the key and
    value gradients of each group itself). torch's `varlen_attn` before `enable_gqa` only
    passes equal head counts, so keys and values were repeated to every query head: a copy
    of each forward and a sum of each backward, ~1 ms a step on the 1.5B shape (H200)."""

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
                    longest: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each segment of packed [T, heads, dim] tensors.

    Segment i is rows cu_seqlens[i]:cu_seqlens[i+1]; no query sees a key of another segment.
    """
    if varlen_available(q.device, q.dtype):
        kernel, causal, native_gqa = _VARLEN
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if k.shape[1] != q.shape[1] and not native_gqa and FLASH_GQA:
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
                     softcap: float | None = None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
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
    out = attend_segments(q, k, v, cu_seqlens, longest, scaling)
    if keep is not None:
        full = out.new_zeros(batch * length, heads, dim)
        full[keep] = out
        out = full
    return out.view(batch, length, heads, dim), None


def register_attention() -> None:
    """Make both `varlen_attention` names known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionInterface.register(ATTENTION_PADDED, varlen_attention)
    try:  # the padding mask must reach the attention function as a 2D tensor, as for FA2
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

        AttentionMaskInterface.register(ATTENTION_PADDED, flash_attention_mask)
    except ImportError:
        pass


def use_varlen_attention(model: torch.nn.Module, padded: bool = False) -> None:
    """Switch `model` (and every sub-model) to `varlen_attention`, for packed or padded batches."""
    register_attention()
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


# -- batches --------------------------------------------------------------------------------

def pack_rows(rows: list[Rendered], max_tokens: int, prefix: int = 0) -> list[list[Rendered]]:
    """Group rows into as few micro-batches of at most `max_tokens` tokens (each row counted
    with `prefix` virtual tokens) as first-fit decreasing finds; a row longer than the budget
    gets a micro-batch of its own."""
    bins: list[list[Rendered]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: len(r.input_ids), reverse=True):
        n = len(row.input_ids) + prefix
        for i, free in enumerate(room):
            if n <= free:
                bins[i].append(row)
                room[i] -= n
                break
        else:
            bins.append([row])
            room.append(max_tokens - n)
    return bins


def packed_inputs(rows: list[Rendered], prefix: int = 0) -> dict:
    """A packed micro-batch with the keyword arguments `varlen_attention` reads. With a
    `prefix`, each row starts with that many placeholder positions (positions 0..prefix-1, no
    loss) where `with_prompt` puts the virtual tokens: PEFT's layout, row by row."""
    if prefix:
        rows = [Rendered([0] * prefix + r.input_ids, [IGNORE] * prefix + r.labels, r.truncated) for r in rows]
    batch = pack_batch(rows)
    lengths = batch.pop("seq_lengths")
    batch["labels"] = shift_labels(batch["labels"], lengths)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
    return batch


def padded_inputs(rows: list[Rendered], pad_id: int) -> dict:
    batch = pad_batch(rows, pad_id)
    batch["labels"] = shift_labels(batch["labels"])
    return batch


# -- loss -----------------------------------------------------------------------------------

@dataclass
class LossPlan:
    """How `token_loss_sum` reaches the logits of one model (found by `plan_loss`)."""
    trunk: torch.nn.Module | None
    """Decoder stack returning hidden states; None: run the whole model for logits."""
    head: torch.nn.Module | None
    """Plain linear output layer applied to the trunk's hidden states."""
    prefix: int = 0
    """Positions the model prepends to the input (virtual tokens of prompt-learning methods)."""
    prompt: object = None
    """With a prefix: returns its [prefix, hidden] input embeddings (`virtual_tokens.trainable_prompt`),
    so packed rows can carry their virtual tokens (`with_prompt`); None: only PEFT's padded forward."""


def model_parts(net: torch.nn.Module):
    """(decoder trunk, output layer) of a causal LM, through a PEFT wrapper if there is one."""
    model = net.get_base_model() if hasattr(net, "get_base_model") else net
    trunk = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return trunk, head


@torch.no_grad()
def plan_loss(net: torch.nn.Module, device: torch.device, autocast) -> LossPlan:
    """Check on a few tokens whether the model's logits are `head(trunk(x))`; find any prefix."""
    trunk, head = model_parts(net)
    was_training = net.training
    net.eval()  # no dropout, so both ways compute the same function
    try:
        ids = torch.arange(1, 9, device=device)[None] % 100
        with autocast:
            logits = net(input_ids=ids, use_cache=False).logits
            prefix = logits.shape[1] - ids.shape[1]
            if trunk is None or type(head) is not torch.nn.Linear or head.weight.shape[0] != logits.shape[-1]:
                return LossPlan(None, None, prefix)
            prompt = None
            if prefix:
                from .methods.virtual_tokens import trainable_prompt

                prompt = trainable_prompt(net)
                if prompt is None:
                    return LossPlan(None, None, prefix)
                positions = torch.arange(prefix + ids.shape[1], device=device)[None]
                inputs = with_prompt(LossPlan(trunk, head, prefix, prompt),
                                     {"input_ids": torch.cat([ids.new_zeros(1, prefix), ids], 1),
                                      "position_ids": positions})
            else:
                inputs = {"input_ids": ids}
            mine = head(trunk(**inputs, use_cache=False).last_hidden_state)
            if torch.allclose(mine.float(), logits.float(), rtol=1e-3, atol=1e-3):
                return LossPlan(trunk, head, prefix, prompt)
        return LossPlan(None, None, prefix)
    finally:
        net.train(was_training)


def with_prompt(plan: LossPlan, batch: dict) -> dict:
    """`batch` with `input_ids` replaced by `inputs_embeds` whose virtual-token positions (the
    first `plan.prefix` positions of each row, where position_ids < prefix) hold the prompt.

    The prompt goes in through a one-hot matmul rather than an index, so its gradient is a
    plain matmul too: deterministic on the GPU, where an indexed backward adds atomically.
    """
    batch = dict(batch)
    ids, positions = batch.pop("input_ids"), batch["position_ids"]
    embeds = plan.trunk.get_input_embeddings()(ids)
    prompt = plan.prompt().to(embeds.dtype)
    one_hot = (positions[..., None] == torch.arange(plan.prefix, device=ids.device)).to(embeds.dtype)
    batch["inputs_embeds"] = torch.where(positions[..., None] < plan.prefix, one_hot @ prompt, embeds)
    return batch


def token_loss_sum(net: torch.nn.Module, batch: dict, plan: LossPlan, device, autocast,
                   reduction: str = "sum") -> torch.Tensor:
    """Summed (or per-token, `reduction="none"`) cross-entropy over the supervised positions
    of one micro-batch; `batch["labels"]` are already shifted (position t holds token t+1)."""
    labels = batch["labels"].flatten()
    positions = (labels != IGNORE).nonzero().squeeze(1)  # on the host: no device sync
    targets = labels[positions].to(device, non_blocking=True)
    positions = positions.to(device, non_blocking=True)
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items() if k != "labels"}
    with autocast:
        if plan.trunk is not None and (not plan.prefix or "cu_seq_lens_q" in batch):
            if plan.prefix:  # packed rows that carry their virtual tokens
                batch = with_prompt(plan, batch)
            hidden = plan.trunk(**batch, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
            if reduction == "sum":
                return linear_cross_entropy(hidden, plan.head.weight, targets, plan.head.bias)
            logits = plan.head(hidden)
        else:
            logits = net(**batch, use_cache=False).logits[:, plan.prefix:].flatten(0, 1)[positions]
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def compile_layers(trunk: torch.nn.Module, backend: str = "inductor") -> int:
    """Regional torch.compile: every decoder layer (the modules of the trunk's `layers` list)
    compiled with dynamic shapes, so packed micro-batches of any length reuse one compilation.
    Inside CUDA graphs the compiled kernels are captured like any other. Returns the count."""
    from .config import ConfigError

    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"`--train.compile` needs a decoder with a `layers` list; "
                          f"{type(trunk).__name__} has none: use --train.compile false")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


# -- setup ----------------------------------------------------------------------------------

@dataclass
class FastPath:
    """How one run turns a step's rows into micro-batches and a loss (see `setup`)."""
    packed: bool
    """Rows packed padding-free (True) or right-padded, `micro_batch_size` rows a forward."""
    pad_id: int
    loss: LossPlan
    varlen: bool = False
    """The model attends through `varlen_attention`."""
    graphs: object = None
    """`graphs.GraphedSteps` replaying packed micro-batches as CUDA graphs, or None (eager)."""
    attention_before: str | None = None
    """The model's own attention implementation, before `varlen_attention` replaced it."""
    kl: float = 0.0
    """Weight of the KL-to-base term on marked rows (`mitigate.py`); 0: none."""

    def micro_batches(self, rows: list[Rendered], micro_batch_size: int, micro_batch_tokens: int) -> list[dict]:
        """Model inputs for `rows`, split so each forward pass stays within budget.

        Splitting never changes what a step learns: the step's loss is a sum over the same
        rows whatever the grouping. Padded micro-batches take rows sorted by length, which
        cuts padding; packed ones hold at most `micro_batch_tokens` tokens.
        """
        if self.packed:
            prefix = self.loss.prefix
            return [packed_inputs(group, prefix) for group in pack_rows(rows, micro_batch_tokens, prefix)]
        ordered = sorted(rows, key=lambda r: len(r.input_ids))
        return [padded_inputs(ordered[i:i + micro_batch_size], self.pad_id)
                for i in range(0, len(ordered), micro_batch_size)]


def setup(net: torch.nn.Module, packing: str, supports_packing: bool, device: torch.device,
          autocast, pad_id: int, attn_implementation: str | None = None, cuda_graphs: bool = True,
          fuse_lora: bool = True) -> FastPath:
    """Decide packing, attention and graphs for one run and switch the model over.

    packing `auto` packs where the method supports it and FlashAttention varlen runs (CUDA,
    bf16/fp16); `on` packs anywhere the method allows (on CPU through the exact per-row
    fallback); `off` pads. On CUDA the padded path uses the same varlen kernel (padding
    dropped) unless the user named an `attn_implementation`. Packed micro-batches on CUDA
    replay as CUDA graphs (`graphs.py`) when `cuda_graphs`, the loss has the trunk + head
    form and activations are not checkpointed (recomputation saves and restores RNG state,
    which a graph cannot). Plain LoRA projections train through `methods.lora_fused` (same
    values and gradients as PEFT's forward, fewer kernels: 7,680 -> 6,513 a step on the 1.5B
    shape) when `fuse_lora`.
    """
    from .config import check
    from .methods import lora_fused

    model = net.get_base_model() if hasattr(net, "get_base_model") else net
    dtype = next(model.parameters()).dtype
    check(packing != "on" or supports_packing, "train.packing",
          "auto or off for this method (it cannot train on packed rows)", packing)
    check(packing != "on" or attn_implementation in (None, ATTENTION, ATTENTION_PADDED), "train.packing",
          f"auto or off when --model.attn_implementation is {attn_implementation!r} (packed rows "
          f"need tunelab's varlen attention to stay apart)", packing)
    if fuse_lora:
        lora_fused.fuse(net)
    fast_kernel = varlen_available(device, dtype)
    packed = packing == "on" or (packing == "auto" and supports_packing and fast_kernel
                                 and attn_implementation in (None, ATTENTION, ATTENTION_PADDED))
    varlen = packed or (fast_kernel and attn_implementation is None)
    if not varlen:
        return FastPath(packed=False, pad_id=pad_id, loss=plan_loss(net, device, autocast))
    previous = model.config._attn_implementation
    use_varlen_attention(model, padded=not packed)
    try:
        fast = FastPath(packed=packed, pad_id=pad_id, loss=plan_loss(net, device, autocast), varlen=True,
                        attention_before=previous)
        if packed and fast.loss.prefix and fast.loss.prompt is None:
            check(packing != "on", "train.packing", "auto or off for this model (its virtual tokens "
                  "cannot be placed in packed rows)", packing)
            fast.packed = False
            use_varlen_attention(model, padded=True)
        if (cuda_graphs and fast.packed and device.type == "cuda" and fast.loss.trunk is not None
                and not getattr(model, "is_gradient_checkpointing", False)):
            from .graphs import GraphedSteps

            params = [p for p in net.parameters() if p.requires_grad]
            fast.graphs = GraphedSteps(net, fast.loss, params, pad_id, autocast)
        return fast
    except NotImplementedError:  # e.g. prefix tuning: keys come from a cache as well
        if packed:
            raise
        set_attention(model, previous)
        return FastPath(packed=False, pad_id=pad_id, loss=plan_loss(net, device, autocast))
