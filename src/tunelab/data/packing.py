"""Packing: a step's rows grouped into micro-batches of at most N tokens, padding-free.

`pack_rows` groups rows (first-fit decreasing), `packed_inputs` turns a group into one
[1, T] sequence with the row boundaries (cu_seqlens) `accel.attention.varlen_attention`
reads, `padded_inputs` is the right-padded batch of methods that cannot pack. Labels come
out already shifted (position t holds token t+1), as `accel.loss.token_loss_sum` wants them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collate import pack_batch, pad_batch, shift_labels
from .template import IGNORE, Rendered


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


