"""LoRA's training forward and backward in as few kernels as the math allows.

PEFT's `lora.Linear.forward` is written for every case (several adapters, variants, mixed
batches) and, for the common one, runs about a dozen small operations per projection and
twice as many in autograd's backward: the input upcast to the adapter's fp32, dropout, the
weights cast down again by autocast, two matmuls, a scale and an add. On a packed step of a
few thousand tokens those kernels, not the matmuls, set the speed (docs/PERFORMANCE.md).

`fuse(model)` routes every plain LoRA projection (one active adapter, no DoRA or other
variant, a `torch.nn.Linear` base) through `_LoraGroup`, which computes, for the G
projections g that read the same input x (q/k/v of an attention block, gate/up of an MLP;
found by watching one probe forward, so no architecture is named here),

    y_g = x W_g^T + b_g + s_g * (dropout_g(x) A_g^T) B_g^T

with every dropout mask of the group drawn by one kernel (each projection its own mask,
as PEFT draws them; `kernels/lora_dropout.py`), the G low-rank products as one batched matmul, the
adapter product added by the matmul that computes it (`addmm_`), and a hand-written
backward: the adapters' part of the input gradient of all G projections in one kernel,
the base part added by the matmuls themselves, A's gradients in one batched matmul,
written in fp32 by the matmul where torch can. (`fuse(..., dropout_bits=True)`, on with
`--train.lora_dropout_kernel bits`, draws the masks and computes the low-rank products in
one kernel and keeps only mask bits for a backward kernel that gives both gradients: less
memory, a little slower.)

A group whose outputs are much wider than its input (`FOLD_RATIO`; gate/up: 2 x 8,960 for
1,536 on the 1.5B shape) folds B into the base matmul instead:
y_g = [x | low_1 .. low_G] @ [W_g | 0 .. B_g .. 0]^T, so no pass of the adapter reads and
rewrites the outputs, and in backward the same matmul that gives x's gradient gives low's. The base weights then live in the left columns of one buffer
(`LoraGroup.fold`: views, no extra memory) until `unfuse`.

The adapter weights stay where PEFT keeps them (fp32 on a half-precision base, so the
optimizer updates fp32 weights). Their compute-dtype copies, with the scale s_g folded into
A, live in one buffer per model (`AdapterCopies`), rebuilt from the live weights by two
kernels at the start of every forward (when the forward reaches the store's first group)
instead of two casts per projection per forward. Nothing decides whether the weights have
changed: a fused AdamW step updates them in place without bumping their version counters,
and a copy kept by such a test once trained every eager path against its initial weights.
Inside a CUDA graph the rebuild is captured with the forward, so every replay sees the
latest weights too.
Saving, loading and merging are PEFT's, untouched: only `forward` changes, and only while
the layer is in its plain state (with or without gradients: held-out losses use it too);
anything else (adapters disabled or merged, several adapters, mixed-batch `adapter_names`)
goes through PEFT's own forward.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from .kernels.lora_dropout import dropout_low, dropout_low_backward, fp32_product


FOLD_RATIO = 4
"""A group folds B into its base matmuls when its outputs are together at least this many
times as wide as its input: gate/up on Qwen2 shapes. 1 folds q/k/v and o too: slower
(docs/PERFORMANCE.md), as building [x | low] costs what the adapter's passes over outputs
that narrow saved."""


class _LoraGroup(torch.autograd.Function):
    """The G projections of one `LoraGroup` on one input; returns their G outputs."""

    @staticmethod
    def forward(ctx, x, group, p: float, *adapters):  # adapters: A_1..A_G, B_1..B_G (for their grads)
        a, b = group.copies()  # [G, r, in] (scale folded in), list of [N_g, r]
        rows = x.reshape(-1, x.shape[-1]).to(a.dtype)
        # [G, T, r]; the masks as the backward needs them
        low, drawn = dropout_low(rows, a, p, bits=group.dropout_bits, triton_kernels=group.triton_kernels)
        if group.extended is not None:  # B folded into the base matmul: [x | low_1 .. low_G] @ [W_g | B_g]^T
            rows_ext = torch.cat([rows, *low.unbind(0)], dim=1)
        outputs = []
        for g, base in enumerate(group.bases):
            inputs, weight = (rows, base.weight) if group.extended is None else (rows_ext, group.extended[g])
            out = (inputs @ weight.t() if base.bias is None
                   else torch.addmm(base.bias.to(a.dtype), inputs, weight.t()))
            if group.extended is None:
                out.addmm_(low[g], b[g].t())
            outputs.append(out.view(*x.shape[:-1], base.weight.shape[0]))
        # the adapter copies too: a refresh before backward is caught; x only where the draw did not copy it
        ctx.save_for_backward(None if len(drawn) == 2 else rows, low, a, *drawn, *b)
        ctx.group, ctx.p, ctx.x_dtype, ctx.x_shape, ctx.drawn = group, p, x.dtype, x.shape, len(drawn)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        group, p = ctx.group, ctx.p
        rows, low, a, *saved = ctx.saved_tensors
        drawn, b = tuple(saved[:ctx.drawn]), saved[ctx.drawn:]
        grads = [g.reshape(-1, g.shape[-1]).to(a.dtype) for g in grads]
        if group.extended is not None:  # one matmul a member gives the base gradient and grad_low
            grad_ext = grads[0] @ group.extended[0]
            for g in range(1, group.size):
                grad_ext.addmm_(grads[g], group.extended[g])
            width = group.in_features
            grad_low = grad_ext[:, width:].view(-1, group.size, group.rank).transpose(0, 1).contiguous()
        else:
            grad_low = torch.empty_like(low, memory_format=torch.contiguous_format)
            for g in range(group.size):
                torch.mm(grads[g], b[g], out=grad_low[g])
        grad_b = [fp32_product(torch.mm, grads[g].t(), low[g]) for g in range(group.size)]
        need_x = ctx.needs_input_grad[0]
        add = grad_ext[:, :width] if group.extended is not None else None  # the base part, [T, in]
        grad_x, grad_a = dropout_low_backward(grad_low, a, drawn, rows, p, group.scale, add=add, need_x=need_x,
                                              triton_kernels=group.triton_kernels)
        if need_x:
            if group.extended is None:
                for g, base in enumerate(group.bases):
                    grad_x.addmm_(grads[g], base.weight)
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        adapters = group.adapters()
        grad_params = [grad.to(param.dtype) for grad, param in zip([*grad_a, *grad_b], adapters)]
        return (grad_x, None, None, *grad_params)


class AdapterCopies:
    """The compute-dtype copies of every fused adapter weight of one model, in one buffer.

    `refresh` rebuilds them in two kernels (a concatenation and a scaled cast); the store's
    first group (the first a forward reaches) calls it at the start of every forward.
    """

    def __init__(self, groups: list, dtype: torch.dtype, device: torch.device):
        self.groups, self.dtype = groups, dtype
        self.params = [p for group in groups for p in group.adapters()]
        sizes = [p.numel() for p in self.params]
        self.staging = torch.empty(sum(sizes), dtype=self.params[0].dtype, device=device)
        self.flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        scale = []
        for group in groups:  # A scaled by s_g, B as it is
            scale += [torch.full((p.numel(),), s) for p, s in zip(group.adapters()[:group.size], group.scales)]
            scale += [torch.ones(p.numel()) for p in group.adapters()[group.size:]]
        self.scale = torch.cat(scale).to(device=device, dtype=self.staging.dtype)
        offset = 0  # each group's A copies as one [G, r, in] block, then its B copies
        for group in groups:
            n = group.size * group.rank * group.in_features
            group.a_copy = self.flat[offset:offset + n].view(group.size, group.rank, group.in_features)
            offset += n
            group.b_copy = []
            start = offset
            for out in group.out_features:
                group.b_copy.append(self.flat[offset:offset + out * group.rank].view(out, group.rank))
                offset += out * group.rank
            if group.extended is not None:
                group.b_sources = ([self.flat[start:offset].view(group.size, group.out_features[0], group.rank)]
                                   if len(group.b_blocks) == 1 else group.b_copy)
        self.first = groups[0]
        self.refresh()

    def refresh(self) -> None:
        torch.cat([p.detach().reshape(-1) for p in self.params], out=self.staging)
        torch.mul(self.staging, self.scale, out=self.flat)
        for group in self.groups:
            if group.extended is not None:  # B's copies live in the columns of the base weights
                for block, source in zip(group.b_blocks, group.b_sources):
                    block.copy_(source)


class LoraGroup:
    """LoRA projections that read the same input tensor, computed together by `_LoraGroup`.

    The first member called in a forward computes every member's output; the others take
    theirs. A member called with another input (a model whose forward changed) recomputes
    the group: correct, only slower.
    """

    def __init__(self, layers: list, names: list[str]):
        self.layers, self.names, self.size = layers, names, len(layers)
        self.position = {id(layer): i for i, layer in enumerate(layers)}
        self.bases = [layer.base_layer for layer in layers]
        self.in_features = layers[0].base_layer.in_features
        self.rank = layers[0].lora_A[names[0]].out_features
        self.out_features = [base.out_features for base in self.bases]
        self.scales = [float(layer.scaling[name]) for layer, name in zip(layers, names)]
        scale = torch.tensor(self.scales, dtype=torch.float32)[:, None, None]
        self.scale = (self.scales[0] if len(set(self.scales)) == 1
                      else scale.to(layers[0].lora_A[names[0]].weight.device))
        self.store: AdapterCopies | None = None
        self.a_copy = None
        self.b_copy = None
        self.extended = None  # folded groups: each member's [W_g | 0 .. B_g .. 0], [N_g, in + G r]
        self.b_blocks = None  # the B columns of `extended`: one [G, N, r] view if the N_g are equal, else G
        self.b_sources = None  # where `AdapterCopies` builds them, matching `b_blocks`
        self.pending = None  # (input, its version, outputs, members served) of the forward under way
        self.bypass = False  # `bypassed`: PEFT's own forward for a while
        self.dropout_bits = False  # `kernels.lora_dropout`'s mask-bits pair (`fuse(dropout_bits=)`)
        self.triton_kernels = True  # its Triton kernels on CUDA (False: torch ops)

    def foldable(self, ratio: float | None = None) -> bool:
        """Worth folding B into the base matmul: outputs together `ratio` (`FOLD_RATIO`) times
        as wide as the input, so the adapter's passes over the outputs (adding its product, and
        in backward reading their gradient for grad_low) cost more than building [x | low]."""
        return (sum(self.out_features) >= (FOLD_RATIO if ratio is None else ratio) * self.in_features
                and all(base.weight.is_contiguous() for base in self.bases))

    def fold(self) -> None:
        """Store the members' base weights as the left columns of one [sum N_g, in + G r]
        buffer (their `weight` becomes a view: no extra memory), member g's rows with B_g's
        columns at in + g r beside them (`extended[g]`: its [N_g, in + G r] rows)."""
        width, rank, size = self.in_features, self.rank, self.size
        weight = self.bases[0].weight
        row = width + size * rank
        extended = torch.zeros(sum(self.out_features), row, dtype=weight.dtype, device=weight.device)
        self.extended, self.b_blocks, start = [], [], 0
        for g, (base, n) in enumerate(zip(self.bases, self.out_features)):
            member = extended[start:start + n]
            member[:, :width] = base.weight.data
            base.weight.data = member[:, :width]
            self.extended.append(member)
            self.b_blocks.append(member[:, width + g * rank:width + (g + 1) * rank])
            start += n
        if len(set(self.out_features)) == 1:  # one strided view covers every member's B: one copy a refresh
            n = self.out_features[0]
            self.b_blocks = [extended.as_strided((size, n, rank), (n * row + rank, row, 1),
                                                 extended.storage_offset() + width)]

    def unfold(self) -> None:
        for base in self.bases:
            base.weight.data = base.weight.data.contiguous()
        self.extended = self.b_blocks = self.b_sources = None

    def adapters(self) -> list[torch.nn.Parameter]:
        return ([layer.lora_A[n].weight for layer, n in zip(self.layers, self.names)]
                + [layer.lora_B[n].weight for layer, n in zip(self.layers, self.names)])

    def copies(self):
        if self.store.first is self:  # a new forward: the copies from the weights as they are now
            self.store.refresh()
        return self.a_copy, self.b_copy

    def plain(self) -> bool:
        return all(_plain(layer) == name for layer, name in zip(self.layers, self.names))

    @torch.compiler.disable  # (--train.compile) the group's bookkeeping stays in Python
    def output(self, layer, x: torch.Tensor) -> torch.Tensor:
        i = self.position[id(layer)]
        pending = self.pending
        if pending is None or pending[0] is not x or pending[1] != x._version or i in pending[3]:
            dropout = layer.lora_dropout[self.names[i]]
            p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
            with torch.autocast(x.device.type, enabled=False):
                outputs = _LoraGroup.apply(x, self, float(p), *self.adapters())
            pending = self.pending = (x, x._version, outputs, set())
        pending[3].add(i)
        if len(pending[3]) == self.size:
            self.pending = None
        return pending[2][i]


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
    group = self._tunelab_group
    if args or kwargs or group.bypass or not group.plain():
        return self._peft_forward(x, *args, **kwargs)
    return group.output(self, x)


def fusable(layer) -> bool:
    """A PEFT LoRA `Linear` over a plain frozen `torch.nn.Linear` whose dropout is plain dropout."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or type(layer.base_layer) is not torch.nn.Linear:
        return False
    base = layer.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    return all(isinstance(d, (torch.nn.Dropout, torch.nn.Identity)) for d in layer.lora_dropout.values())


def _signature(layer, name: str) -> tuple:
    """What projections must share to be computed as one group."""
    dropout = layer.lora_dropout[name]
    a = layer.lora_A[name].weight
    return (layer.base_layer.in_features, a.shape[0], dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0,
            layer.base_layer.weight.dtype, layer.base_layer.weight.device, a.dtype)


@torch.no_grad()
def shared_input_groups(model: torch.nn.Module, layers: list) -> list[list]:
    """`layers` partitioned into groups that a probe forward calls one after another on the
    very same input tensor; a layer the probe does not reach is a group of its own."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: calls.append((m, args[0] if args else None)))
             for layer in layers]
    was_training = model.training
    try:
        embeddings = model.get_input_embeddings()
        device = embeddings.weight.device
        ids = torch.arange(1, 9, device=device)[None] % embeddings.num_embeddings
        model.eval()
        model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - a model the probe cannot run: every projection alone
        calls = []
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    groups, placed, current, current_input = [], {}, [], None
    for layer, x in calls:
        if id(layer) in placed:
            continue
        name = _plain(layer)
        joins = (current and x is not None and x is current_input and name is not None
                 and _signature(layer, name) == _signature(current[0], _plain(current[0])))
        if not joins:
            current, current_input = [], x
            groups.append(current)
        current.append(layer)
        placed[id(layer)] = True
    groups = [g for g in groups if g]
    groups += [[layer] for layer in layers if id(layer) not in placed]
    return groups


def fuse(model: torch.nn.Module, group: bool = True, fold: bool = True, fold_ratio: float | None = None,
         dropout_bits: bool = False, triton_kernels: bool = True) -> int:
    """Route every fusable LoRA projection of `model` through `_LoraGroup`; returns how many.
    `group=False` computes every projection alone, `fold=False` never folds B into the base
    matmul, `fold_ratio` replaces `FOLD_RATIO` (benchmark levers, `accel.Levers`);
    `dropout_bits` (`--train.lora_dropout_kernel bits`) draws the dropout with the mask-bits
    pair, `triton_kernels=False` with torch ops (`kernels/lora_dropout.py`)."""
    layers = [m for m in model.modules() if fusable(m) and not hasattr(m, "_peft_forward")
              and _plain(m) is not None]
    if not layers:
        return 0
    members_of = shared_input_groups(model, layers) if group else [[layer] for layer in layers]
    groups = [LoraGroup(members, [_plain(m) for m in members]) for members in members_of]
    for g in groups:
        g.dropout_bits, g.triton_kernels = dropout_bits, triton_kernels
        if fold and g.foldable(fold_ratio):
            g.fold()
    by_store: dict[tuple, list] = {}
    for group in groups:
        weight = group.bases[0].weight
        by_store.setdefault((weight.dtype, weight.device), []).append(group)
    stores = [AdapterCopies(members, dtype, device) for (dtype, device), members in by_store.items()]
    for store in stores:
        for group in store.groups:
            group.store = store
    for group in groups:
        for layer in group.layers:
            layer._tunelab_group = group
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)


def refresh(model: torch.nn.Module) -> None:
    """Rebuild the compute copies of `model`'s fused adapters now (inside a CUDA graph
    capture this puts the rebuild into the graph, so every replay sees the latest weights)."""
    stores = {id(group.store): group.store for group in groups_of(model)}
    for store in stores.values():
        store.refresh()


@contextmanager
def bypassed(model: torch.nn.Module):
    """`model`'s fused layers run PEFT's own forward inside the block (the invariants' plain
    reference); the groups stay formed, so nothing is rebuilt."""
    groups = groups_of(model)
    for group in groups:
        group.bypass = True
    try:
        yield model
    finally:
        for group in groups:
            group.bypass = False


def groups_of(model: torch.nn.Module) -> list[LoraGroup]:
    """The groups `fuse` formed, in the order the probe met them."""
    seen, groups = set(), []
    for module in model.modules():
        group = getattr(module, "_tunelab_group", None)
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    return groups


def unfuse(model: torch.nn.Module) -> None:
    """Give every layer `fuse` changed its PEFT forward back (and its own weight storage)."""
    for group in groups_of(model):
        if group.extended is not None:
            group.unfold()
    for layer in model.modules():
        if hasattr(layer, "_peft_forward"):
            layer.forward = layer._peft_forward
            del layer._peft_forward
            del layer._tunelab_group
