"""Data: files -> validated conversations -> rendered rows (ids + labels) -> batches.

`prepare` runs the whole stage before any model is loaded: a bad file fails in
seconds, not after minutes of loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DataConfig
from .formats import DataError, Example, load_examples, split
from .template import IGNORE, ChatFormat, Rendered, TemplateError, TooLongError, visualize


@dataclass
class Prepared:
    train: list[Rendered]
    val: list[Rendered]
    val_examples: list[Example]
    stats: dict = field(default_factory=dict)

    def summary(self, cfg: DataConfig) -> str:
        """One line for `train`: the rows used, and how many were skipped, cut or dropped, and why."""
        s = self.stats
        text = f"data {cfg.path}: {s['records_read']} records, {len(self.train)} train rows, {len(self.val)} held out"
        if s["bad_records"]:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(s["skipped_by_reason"].items()))
            text += f"; skipped {s['bad_records']} bad records (--data.on_error skip: {reasons})"
        if s["truncated"]:
            text += (f"; {s['truncated']} rows longer than --data.max_length {cfg.max_length} had the start "
                     f"of their conversation cut (--data.truncation prompt)")
        if s["dropped_too_long"]:
            text += (f"; dropped {s['dropped_too_long']} rows longer than --data.max_length {cfg.max_length} "
                     f"or with no answer token left to learn (--data.truncation {cfg.truncation})")
        if s["duplicates"]:
            text += f"; {s['duplicates']} exact duplicates (kept)"
        return text


def render_all(examples: list[Example], fmt: ChatFormat, cfg: DataConfig) -> tuple[list[Rendered], int, int]:
    """Render `examples`; returns (rows, truncated, dropped)."""
    rows, truncated, dropped = [], 0, 0
    for example in examples:
        try:
            row = fmt.render(example.messages, cfg.max_length, cfg.supervise, cfg.truncation)
        except TooLongError as err:
            raise DataError(f"{example.source}: {err} (--data.truncation error)") from None
        if row is None or row.num_supervised == 0:
            dropped += 1
            continue
        truncated += row.truncated
        rows.append(row)
    return rows, truncated, dropped


def token_stats(rows: list[Rendered]) -> dict:
    lengths = sorted(len(r.input_ids) for r in rows)
    if not lengths:
        return {"rows": 0, "tokens": 0}
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {
        "rows": len(rows),
        "tokens": sum(lengths),
        "supervised_tokens": sum(r.num_supervised for r in rows),
        "mean": round(sum(lengths) / len(lengths), 1),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": lengths[-1],
    }


def prepare(cfg: DataConfig, fmt: ChatFormat) -> Prepared:
    """Load, validate, split and render the data set named by `cfg`."""
    loaded = load_examples(cfg.path, cfg.system_prompt, cfg.on_error, cfg.limit)
    train_examples, val_examples = split(loaded.examples, cfg.val_size, cfg.seed)
    train_rows, truncated, dropped = render_all(train_examples, fmt, cfg)
    val_rows, val_truncated, val_dropped = render_all(val_examples, fmt, cfg)
    if not train_rows:
        raise DataError(f"{cfg.path}: no training row is left after rendering "
                        f"({dropped} dropped as longer than --data.max_length {cfg.max_length})")
    stats = {
        "path": cfg.path,
        "records_read": loaded.n_read,
        "bad_records": len(loaded.bad),
        "skipped_by_reason": loaded.skipped_by_reason,
        "duplicates": loaded.duplicates,
        "truncated": truncated + val_truncated,
        "dropped_too_long": dropped + val_dropped,
        "train": token_stats(train_rows),
        "val": token_stats(val_rows),
    }
    return Prepared(train_rows, val_rows, val_examples, stats)


__all__ = ["IGNORE", "ChatFormat", "DataError", "Example", "Prepared", "Rendered", "TemplateError",
           "load_examples", "prepare", "render_all", "split", "token_stats", "visualize"]
