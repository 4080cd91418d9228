"""`tunelab data inspect`: row and token statistics, and one row with its supervised tokens marked."""

from __future__ import annotations

import sys
from typing import Optional

from ..config import DataConfig, ModelConfig
from . import ChatFormat, prepare, visualize


def inspect_data(data: DataConfig, model: ModelConfig, row: int = 0, color: Optional[bool] = None) -> dict:
    """Print statistics of a data set as tunelab renders it, and one rendered row.

    Args:
        data: the data set and how it is rendered.
        model: the model whose tokenizer and chat template render it (only the tokenizer is loaded).
        row: index of the training row to print with its supervised tokens marked.
        color: mark supervised tokens in green (default: when printing to a terminal).
    """
    from ..models import load_tokenizer  # torch at its top: `tunelab --help` reads this module

    tokenizer = load_tokenizer(model)
    fmt = ChatFormat(tokenizer)
    prepared = prepare(data, fmt)
    stats = prepared.stats
    train, val = stats["train"], stats["val"]
    print(f"{data.path}: {stats['records_read']} records read, {stats['bad_records']} bad "
          f"{stats['skipped_by_reason'] or ''}, {stats['duplicates']} exact duplicates")
    print(f"end of turn: {fmt.end_of_turn_text or tokenizer.eos_token!r} (id {fmt.end_of_turn_id})")
    for name, s in (("train", train), ("held-out", val)):
        if s.get("rows"):
            print(f"{name:>8}: {s['rows']} rows, {s['tokens']} tokens ({s['supervised_tokens']} supervised); "
                  f"per row mean {s['mean']}, p50 {s['p50']}, p95 {s['p95']}, max {s['max']}")
    print(f"max_length {data.max_length}: {stats['truncated']} truncated, "
          f"{stats['dropped_too_long']} dropped (truncation: {data.truncation})")
    if prepared.train:
        sample = prepared.train[min(row, len(prepared.train) - 1)]
        use_color = sys.stdout.isatty() if color is None else color
        legend = "green" if use_color else "[[ ]]"
        print(f"\nrow {row} ({len(sample.input_ids)} tokens, {sample.num_supervised} supervised, "
              f"marked {legend}):")
        print(visualize(tokenizer, sample.input_ids, sample.labels, color=use_color))
    return stats
