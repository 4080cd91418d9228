"""What every decoding path does before its first new token: prompts left-padded into one
batch, and the beginning they share found, so it is computed once (`Engine._prefill`)."""

from __future__ import annotations

import torch


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    for n in range(shortest - 1):
        if any(p[n] != first[n] for p in prompts):
            return n
    return max(shortest - 1, 0)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids, mask
