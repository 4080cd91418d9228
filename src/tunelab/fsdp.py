"""FSDP2 (sharded weights) under torchrun: full, freeze, and the LoRA family's base.

`full` and `freeze` replicate the whole model, its gradients and its AdamW moments on every
card under plain data parallelism (distributed.py). With `--train.distributed auto` (or
`fsdp`) and several processes they are sharded instead, through the composable FSDP2 API
(`torch.distributed.fsdp.fully_shard`): each decoder layer is one FSDP unit (its weights
all-gathered for its forward and backward, its gradients reduce-scattered), then the root
(embeddings, final norm, output layer). Each process keeps 1/N of the weights, gradients
and optimizer state between steps. LoRA (with `--train.distributed fsdp`) is sharded the
same way, PEFT's wrappers and all: each unit holds its frozen base weights and the adapter
inside it, so a base too large for one card's steady state can still be LoRA-tuned. What a
step means does not change:

- gradients are reduce-scattered with SUM, not FSDP's default mean (`shard`): each rank's
  loss is already normalized by the whole step's supervised tokens, so the sum is the
  one-process gradient, as `World.sum_gradients` makes it without sharding;
- they are reduced once per optimizer step, after the last micro-batch (`World.sync_gradients`);
- every rank runs the same number of forward passes (each is collective: the layers'
  weights are all-gathered), so a rank with fewer micro-batches than another runs copies
  with no supervised token, which add nothing (`idle`);
- clipping sees the global norm (a replicated DTensor), so the NaN guard agrees on every rank.

A checkpoint and the saved model are written in the one-process layout (`gathered`): the
trained weights and the optimizer state are gathered to rank 0's CPU with
`torch.distributed.checkpoint.state_dict` (frozen weights are not, unless the method's save
writes them, as `full`'s does: a LoRA base stays sharded), loaded into a plain copy of the
model (kept on the meta device until then; its frozen parameters become stand-ins that take
no memory), and the method's own save writes that copy. So a sharded run resumes on any
number of processes, and a one-process checkpoint resumes sharded (`load_optimizer`; the
weights load into the plain model before it is sharded).
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from .data.template import IGNORE

_PLAIN: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()
"""Sharded model -> a copy of it as it was before sharding, its parameters on the meta
device (no memory): what `gathered` fills with the full weights for a save."""


def is_sharded(tensor) -> bool:
    """Whether `tensor` (a parameter) is a DTensor, i.e. FSDP reduces its gradient itself."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def decoder_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one: those transformers names as never to be split across
    devices (`_no_split_modules`, the decoder layers), outermost first; [] when it names none."""
    names = set(getattr(net, "_no_split_modules", None) or [])
    layers, inside = [], set()
    for module in net.modules():
        if type(module).__name__ in names and id(module) not in inside:
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    return layers


def meta_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `net` whose parameters live on the meta device (ties kept, requires_grad
    kept); buffers and everything else copied as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in net.parameters()}
    return copy.deepcopy(net, memo)


def shard(net: torch.nn.Module, device: torch.device, size: int) -> list[torch.nn.Parameter]:
    """FSDP2 over `size` processes: each decoder layer, then the root, gradients SUM-reduced.
    Returns the trainable parameters as they are now (sharded DTensors, for the optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    _PLAIN[net] = meta_copy(net)  # before sharding: the plain module a save is written from
    mesh = init_device_mesh(device.type, (size,))  # explicit: the default would pick CUDA on a GPU host
    layers = decoder_layers(net)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for module in net.modules():
        if isinstance(module, FSDPModule):
            # Divide by 1 and reduce with SUM: the losses are normalized by the whole step's
            # supervised tokens already. force_sum: a factor alone makes FSDP reduce with
            # PREMUL_SUM(1/factor), which gloo lacks; with it, SUM then a division by 1 (skipped).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    print(f"FSDP2: {len(layers)} decoder layers and the root sharded over {size} processes"
          + ("" if layers else " (the model names no decoder layers: one unit, the whole model)"))
    return [p for p in net.parameters() if p.requires_grad]


def sync_gradients(net: torch.nn.Module, last: bool) -> None:
    """Reduce-scatter gradients after this backward only if it is the step's last one: the
    micro-batches before it accumulate unsharded gradients locally (one reduction a step)."""
    net.set_requires_gradient_sync(last)


def idle(batch: dict) -> dict:
    """`batch` with no supervised position (and no KL term): its loss is exactly 0 and its
    gradients zeros, so a rank can join a forward/backward it has no rows for."""
    return {**{k: v for k, v in batch.items() if k != "kl"}, "labels": torch.full_like(batch["labels"], IGNORE)}


def _names(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names, in the order `optimizer.state_dict()` numbers them."""
    from torch.distributed.fsdp import FSDPModule

    # After a forward with no backward (the loss plan's probe, an evaluation) the root keeps
    # its weights gathered and registered in place of the sharded ones the optimizer holds.
    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    name_of = {id(p): name for name, p in net.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


@contextmanager
def gathered(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None, main: bool, frozen: bool = False):
    """Gather the trained state of the sharded `net` (and `optimizer`) to rank 0's CPU (every
    rank must enter: the gathering is collective); yields, on rank 0 (`main`), a function
    returning (model, optimizer) as one process has them: a plain copy of `net` holding the
    full trained weights (the frozen ones as `filled`'s stand-ins, unless `frozen`: then
    gathered too, for a save that writes them), and a stand-in whose `state_dict()` is the
    full optimizer state numbered as `optimizer.state_dict()` numbers it. Building them is
    left to that function so that its errors happen in rank 0's `World.on_main`, which the
    other ranks hear of. None elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Only what trains, unless the save writes the frozen weights too (full's whole model):
    # gathering a LoRA run's frozen base would put the whole model on rank 0, which is what
    # sharding it avoided, and a LoRA or freeze save reads no frozen weight's values.
    weights = get_model_state_dict(net, options=_options(cpu_offload=True, ignore_frozen_params=not frozen))
    state = (get_optimizer_state_dict(net, optimizer, options=_options(cpu_offload=True))
             if optimizer is not None else None)
    names = _names(net, optimizer) if optimizer is not None else []

    def whole():
        plain = filled(copy.deepcopy(_PLAIN[net]), weights)
        if state is None:
            return plain, None
        index = {name: i for i, name in enumerate(names)}
        numbered = {"state": {index[name]: value for name, value in state["state"].items()},
                    "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                     for group in state["param_groups"]]}
        return plain, SimpleNamespace(state_dict=lambda: numbered)  # all that save_checkpoint asks of it

    try:
        yield whole if main else None
    finally:
        del weights, state


def filled(plain: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """`plain` (a `meta_copy`) holding `weights` (no copy: assigned); tied parameters tied again.
    A frozen parameter `weights` lacks (`gathered` leaves them out) becomes a stand-in on the
    CPU: zeros of its shape and dtype that take one element of memory (expanded), so the
    method's save sees a whole model (PEFT reads a base layer's device, dtype and shape, never
    its values); writing into one fails loudly. A trainable one missing is an error."""
    names = {}  # id of a parameter -> every name it has (more than one: tied)
    for name, param in plain.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    plain.load_state_dict(weights, strict=False, assign=True)
    missing = []
    for tied in names.values():
        first = next((n for n in tied if n in weights), None)
        if first is None:
            frozen = plain.get_parameter(tied[0])
            if frozen.requires_grad:
                missing += tied
                continue
            param = torch.nn.Parameter(torch.zeros((), dtype=frozen.dtype).expand(frozen.shape),
                                       requires_grad=False)
        else:
            param = plain.get_parameter(first)
        for name in tied:
            if name != first:  # assign gave each name its own tensor: one parameter again
                owner, _, leaf = name.rpartition(".")
                setattr(plain.get_submodule(owner), leaf, param)
    if missing:
        raise RuntimeError(f"the gathered weights lack {missing[:5]}: the sharded model and its plain "
                           f"copy do not match")
    return plain


def load_optimizer(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer state (numbered parameters, full tensors) into the
    optimizer of the sharded `net`: each rank keeps its shard of rank 0's values."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names(net, optimizer)
    if len(names) != sum(len(group["params"]) for group in state["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer state covers "
                         f"{sum(len(g['params']) for g in state['param_groups'])} parameters, this model "
                         f"trains {len(names)}")
    named = {"state": {names[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, named, options=_options(broadcast_from_rank0=True))
