"""The loss on supervised positions only, without ever holding the whole logits tensor.

Qwen2's vocabulary has 151,936 ids: the logits of every position, upcast to fp32, dwarf the
rest of a LoRA step. `token_loss_sum` runs the model's trunk, keeps the hidden states of
positions that have a label, and `kernels.cross_entropy.linear_cross_entropy` projects them
onto the vocabulary a chunk at a time, computing each chunk's gradient at once. Models whose
head is not a plain linear layer over the trunk (a softcap, a scale, a prompt-learning
method that prepends virtual tokens) are detected by one numerical check (`plan_loss`) and
keep the whole-logits loss, on supervised positions only. Exact: the same per-token loss as
the whole-logits path, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.template import IGNORE
from .kernels.cross_entropy import linear_cross_entropy

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
    triton_cross_entropy: bool = True
    """`linear_cross_entropy` through its Triton kernel on CUDA (`Levers.triton_cross_entropy`)."""


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
            if (trunk is None or type(head) is not torch.nn.Linear or head.weight.shape[0] != logits.shape[-1]
                    or sharded(net)):
                return LossPlan(None, None, prefix)
            prompt = None
            if prefix:
                # peft loads here, not when accel/ is imported (see attention.register_attention)
                from ..methods.virtual_tokens import trainable_prompt

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


def sharded(net: torch.nn.Module) -> bool:
    """Whether `net` is sharded with FSDP2 (fsdp.py): its root's weights (embeddings, output
    layer) are gathered by the hooks of the whole model's forward only, which the trunk + head
    path bypasses, so a sharded model keeps the whole-logits loss. Looked up, not imported: a
    process that never loaded FSDP holds no sharded model (and a one-process run stays as it was)."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(net, fsdp.FSDPModule)


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
                return linear_cross_entropy(hidden, plan.head.weight, targets, plan.head.bias,
                                            use_triton=plan.triton_cross_entropy)
            logits = plan.head(hidden)
        else:
            logits = net(**batch, use_cache=False).logits[:, plan.prefix:].flatten(0, 1)[positions]
    return F.cross_entropy(logits.float(), targets, reduction=reduction)
