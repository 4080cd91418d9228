"""Rendered rows -> model batches: padded, or packed without padding.

Padded batches are right-padded with labels -100 and an attention mask. Packed batches
concatenate rows into one sequence whose position_ids restart at 0 for every row; the
attention backend must keep each row to itself (see `tunelab.accel.attention`).
"""

from __future__ import annotations

import torch

from .template import IGNORE, Rendered


def pad_batch(rows: list[Rendered], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad `rows` to the longest (rounded up to `multiple_of`)."""
    longest = max(len(r.input_ids) for r in rows)
    width = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_batch(rows: list[Rendered]) -> dict[str, torch.Tensor]:
    """Concatenate `rows` into one [1, total] sequence; no pad token anywhere."""
    ids = [t for r in rows for t in r.input_ids]
    labels = [t for r in rows for t in r.labels]
    positions = [p for r in rows for p in range(len(r.input_ids))]
    lengths = [len(r.input_ids) for r in rows]
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "seq_lengths": torch.tensor(lengths),
    }


def shift_labels(labels: torch.Tensor, seq_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Labels moved one left (token t predicts label t+1), -100 where no next token exists.

    In a packed sequence the last token of a row must not predict the next row's first
    token: with `seq_lengths` each row's final position gets -100 too.
    """
    shifted = torch.full_like(labels, IGNORE)
    shifted[..., :-1] = labels[..., 1:]
    if seq_lengths is not None:
        ends = torch.cumsum(seq_lengths, 0) - 1
        shifted[..., ends] = IGNORE
    return shifted
