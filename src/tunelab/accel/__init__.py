"""The fast training path, behind one door: `prepare(net, ...)` enters every lever, restores after.

Nothing here is needed for correctness: each lever computes what the plain transformers +
PEFT model computes (same per-token loss and gradients, up to rounding), and every file has
an exact torch fallback that the CPU tests run. The levers:

- packing and attention (`attention.py`, `data/packing.py`): a step's rows packed
  padding-free, kept apart by varlen FlashAttention;
- the loss on supervised positions only (`loss.py`, `kernels/cross_entropy.py`), chunked so
  no whole-logits tensor is held;
- fused LoRA (`lora.py`, `kernels/lora_dropout.py`): one autograd function per group of
  projections that read one input;
- liger's RMSNorm / RoPE / SwiGLU kernels (`liger.py`, frozen norms through
  `kernels/rms_norm.py`);
- CUDA-graph replay of packed micro-batches (`graphs.py`) and regional torch.compile.

Which levers a run pulls is one value, `Levers` (from the train config, or built by a
benchmark); docs/PERFORMANCE.md has the measurements behind each default.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace

import torch

from ..config import ConfigError, TrainConfig, check
from ..data.packing import pack_rows, packed_inputs, padded_inputs
from ..data.template import Rendered
from . import liger, lora
from .attention import ATTENTION, ATTENTION_PADDED, set_attention, use_varlen_attention, varlen_available
from .graphs import GraphedSteps
from .loss import LossPlan, model_parts, plan_loss, sharded, token_loss_sum, with_prompt

__all__ = ["Levers", "FastPath", "prepare", "setup", "plain_forward", "compile_layers", "model_parts",
           "token_loss_sum", "with_prompt", "LossPlan", "sharded", "unsharded_levers"]


@dataclass(frozen=True)
class Levers:
    """Every speed lever of one training run. `from_train` reads the user's settings; the rest
    have no flag and exist for benchmarks (each is exact either way)."""
    packing: str = "auto"
    """`--train.packing`: auto, on or off."""
    cuda_graphs: bool = True
    """`--train.cuda_graphs`: packed micro-batches on CUDA replayed as CUDA graphs."""
    compile: bool = False
    """`--train.compile`: each decoder layer compiled (`compile_layers`)."""
    kernels: str = "auto"
    """`--train.kernels`: liger's kernels (auto, liger, torch); torch whenever `compile`."""
    lora_dropout_kernel: str = "copies"
    """`--train.lora_dropout_kernel`: fused LoRA's dropout pair, `copies` or `bits`."""
    fuse_lora: bool | str = True
    """Plain LoRA projections through `lora.fuse`: True (grouped, B folded into wide groups),
    "unfolded" (grouped, never folded), "alone" (each projection alone), False (PEFT's forward)."""
    fold_ratio: float | None = None
    """`lora.FOLD_RATIO` for this run (None: that default)."""
    triton_cross_entropy: bool = True
    """The loss's Triton kernel on CUDA (off: torch ops)."""
    triton_lora_dropout: bool = True
    """Fused LoRA's Triton dropout kernels on CUDA (off: torch ops)."""
    triton_rms_norm: bool = True
    """tunelab's RMSNorm kernels for frozen norms under liger (off: liger's own)."""
    flash_gqa: bool = True
    """Grouped-query attention through FlashAttention's own kernels where torch's `varlen_attn`
    has no `enable_gqa` (off: keys and values repeated to every query head)."""

    @classmethod
    def from_train(cls, cfg: TrainConfig, **overrides) -> "Levers":
        named = {f.name for f in fields(cls)}
        return cls(**{**{k: getattr(cfg, k) for k in named if hasattr(cfg, k)}, **overrides})


@dataclass
class FastPath:
    """How one run turns a step's rows into micro-batches and a loss (see `setup`)."""
    packed: bool
    """Rows packed padding-free (True) or right-padded, `micro_batch_size` rows a forward."""
    pad_id: int
    loss: LossPlan
    varlen: bool = False
    """The model attends through `varlen_attention`."""
    graphs: GraphedSteps | None = None
    """Replays packed micro-batches as CUDA graphs, or None (eager)."""
    attention_before: str | None = None
    """The model's own attention implementation, before `varlen_attention` replaced it."""
    kl: float = 0.0
    """Weight of the KL-to-base term on marked rows (`mitigate.py`); 0: none."""
    liger: bool = False
    """liger's kernels run in the model (set by `prepare`)."""

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


def _base(net: torch.nn.Module) -> torch.nn.Module:
    return net.get_base_model() if hasattr(net, "get_base_model") else net


@contextmanager
def prepare(net: torch.nn.Module, supports_packing: bool, device: torch.device, autocast, pad_id: int,
            levers: Levers = Levers(), attn_implementation: str | None = None, kl: float = 0.0):
    """Within the block `net` trains through every lever `levers` asks for and this machine
    allows; yields the `FastPath` that turns rows into micro-batches and a loss. Afterwards the
    model is as it was: PEFT's LoRA forward, its own attention, transformers' kernels (only
    compiled layers stay compiled). `kl` > 0: the KL-to-base term runs eagerly, so no graphs.
    A model sharded with FSDP2 (fsdp.py) trains without fused LoRA and CUDA graphs.
    """
    if sharded(net):
        levers = unsharded_levers(net, levers, device)
    with ExitStack() as undo:
        if levers.fuse_lora:
            undo.callback(lora.unfuse, net)  # after the fused layers of a failed setup too
        fast = setup(net, levers.packing, supports_packing, device, autocast, pad_id, attn_implementation,
                     cuda_graphs=levers.cuda_graphs, fuse_lora=levers.fuse_lora, fold_ratio=levers.fold_ratio,
                     dropout_bits=levers.lora_dropout_kernel == "bits",
                     triton_dropout=levers.triton_lora_dropout)
        fast.loss.triton_cross_entropy = levers.triton_cross_entropy
        if kl > 0:
            fast.kl = kl
            if fast.graphs is not None:  # the graphed step computes the plain loss only
                fast.graphs = None
                print("--mitigate.kl: CUDA graphs are off for this run (the KL term runs eagerly)")
        if fast.varlen:
            undo.callback(set_attention, _base(net), fast.attention_before)
            if not levers.flash_gqa:
                use_varlen_attention(_base(net), padded=not fast.packed, flash_gqa=False)
        if levers.compile:
            compile_layers(fast.loss.trunk or model_parts(net)[0])
        # (compile: inductor fuses these itself, and liger's autograd functions break its graphs)
        fast.liger = undo.enter_context(liger.liger(_base(net), "torch" if levers.compile else levers.kernels,
                                                    device, fast_norm=levers.triton_rms_norm))
        yield fast


def unsharded_levers(net: torch.nn.Module, levers: Levers, device: torch.device) -> Levers:
    """`levers` without fused LoRA and CUDA graphs, for a model sharded with FSDP2; one line
    says so where either would have run. Its parameters are DTensors, each layer's gathered
    only for its own forward and backward: the fused adapters' compute copies are rebuilt
    from every layer's weights at once, B folded into the base weights' buffer, and a graph
    replays the addresses it captured, all of which assume plain local tensors."""
    off = [what for what, on in (("fused LoRA", levers.fuse_lora and any(lora.fusable(m) for m in net.modules())),
                                 ("CUDA graphs", levers.cuda_graphs and device.type == "cuda")) if on]
    if off:
        print(f"FSDP2: {' and '.join(off)} off for this run (the sharded parameters are DTensors; "
              f"the fused adapter copies and the graphs assume plain local tensors)")
    return replace(levers, fuse_lora=False, cuda_graphs=False)


def setup(net: torch.nn.Module, packing: str, supports_packing: bool, device: torch.device,
          autocast, pad_id: int, attn_implementation: str | None = None, cuda_graphs: bool = True,
          fuse_lora: bool | str = True, fold_ratio: float | None = None, dropout_bits: bool = False,
          triton_dropout: bool = True) -> FastPath:
    """Decide packing, attention and graphs for one run and switch the model over (`prepare`
    does this, then the kernels, and undoes all of it after).

    packing `auto` packs where the method supports it and FlashAttention varlen runs (CUDA,
    bf16/fp16); `on` packs anywhere the method allows (on CPU through the exact per-row
    fallback); `off` pads. On CUDA the padded path uses the same varlen kernel (padding
    dropped) unless the user named an `attn_implementation`. Packed micro-batches on CUDA
    replay as CUDA graphs (`graphs.py`) when `cuda_graphs`, the loss has the trunk + head
    form and activations are not checkpointed (recomputation saves and restores RNG state,
    which a graph cannot). Plain LoRA projections train through `lora.py` (same values and
    gradients as PEFT's forward, fewer kernels) when `fuse_lora` (see `Levers.fuse_lora`), their
    dropout by the mask-bits kernels when `dropout_bits`, by torch ops unless `triton_dropout`.
    """
    model = _base(net)
    dtype = next(model.parameters()).dtype
    check(packing != "on" or supports_packing, "train.packing",
          "auto or off for this method (it cannot train on packed rows)", packing)
    check(packing != "on" or attn_implementation in (None, ATTENTION, ATTENTION_PADDED), "train.packing",
          f"auto or off when --model.attn_implementation is {attn_implementation!r} (packed rows "
          f"need tunelab's varlen attention to stay apart)", packing)
    if fuse_lora:
        lora.fuse(net, group=fuse_lora != "alone", fold=fuse_lora not in ("alone", "unfolded"),
                  fold_ratio=fold_ratio, dropout_bits=dropout_bits, triton_kernels=triton_dropout)
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
            params = [p for p in net.parameters() if p.requires_grad]
            fast.graphs = GraphedSteps(net, fast.loss, params, pad_id, autocast)
        return fast
    except NotImplementedError:  # e.g. prefix tuning: keys come from a cache as well
        if packed:
            raise
        set_attention(model, previous)
        return FastPath(packed=False, pad_id=pad_id, loss=plan_loss(net, device, autocast))


def compile_layers(trunk: torch.nn.Module, backend: str = "inductor") -> int:
    """Regional torch.compile: every decoder layer (the modules of the trunk's `layers` list)
    compiled with dynamic shapes, so packed micro-batches of any length reuse one compilation.
    Inside CUDA graphs the compiled kernels are captured like any other. Returns the count."""
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"`--train.compile` needs a decoder with a `layers` list; "
                          f"{type(trunk).__name__} has none: use --train.compile false")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


@contextmanager
def plain_forward(net: torch.nn.Module, fast: FastPath):
    """`net` computing as PEFT and transformers do on their own: fused LoRA bypassed, the
    model's own attention implementation, compiled layers run eagerly (the learning checks'
    reference, `invariants.py`)."""
    with ExitStack() as stack:
        stack.enter_context(lora.bypassed(net))
        if fast.varlen and fast.attention_before:
            model = _base(net)
            current = model.config._attn_implementation
            set_attention(model, fast.attention_before)
            stack.callback(set_attention, model, current)
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        yield net
