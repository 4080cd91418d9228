"""Decoding with a growing KV cache and a batch that refills itself (the CPU's decoding path).

A CPU decoding step of a small model costs a fixed part (every weight read once: ~100 ms
for a 135M model in fp32 on two cores) plus a part per row (docs/PERFORMANCE.md). A batch
that waits for its longest answer pays the fixed part for a few rows at its end. Here a row
that ends its turn leaves the batch at once (its keys and values with it) and waiting
prompts take the free places ("continuous batching"), so the batch stays nearly full until
the prompts run out.

Rows are aligned on the newest column: prompts joining a batch whose cache is W columns wide
are prefilled together (their shared beginning once, `Engine._prefill`) and left-padded to
W, or the running rows are left-padded when the newcomers are longer. Positions come from
the attention mask, so every row has the positions it has alone, and columns no remaining
row uses are dropped. Tokens are picked as `generate` picks them: argmax, or the same logits
processors and sampling; with `ignore_eos` the stop tokens are never picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

TRIM_AT = 16
"""Leading columns no row uses are dropped once there are this many (dropping copies the cache)."""


@dataclass
class Rows:
    """The rows being decoded: cache, mask and the rest, one entry per row on dim 0."""

    cache: object  # transformers' DynamicCache: .layers[i].keys / .values [rows, kv_heads, columns, dim]
    mask: torch.Tensor  # [rows, columns] 1 where the column holds one of the row's tokens
    seen: torch.Tensor  # [rows, n] the row's tokens so far (repetition penalty), left-padded with its first
    position: torch.Tensor  # [rows] position of the row's newest token
    logits: torch.Tensor  # [rows, vocab] next-token logits
    prompt: list[int]  # which prompt each row answers

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask, self.seen, self.position, self.logits = (t[keep] for t in (self.mask, self.seen, self.position,
                                                                            self.logits))
        self.prompt = [self.prompt[i] for i in keep.tolist()]

    def trim(self) -> None:
        """Drop the leading columns no row uses any more."""
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first >= TRIM_AT:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


def _left_pad(rows: Rows, columns: int, seen_columns: int) -> None:
    """Widen `rows` on the left to `columns` cache columns and `seen_columns` seen tokens."""
    extra = columns - rows.mask.shape[1]
    if extra > 0:
        for layer in rows.cache.layers:
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], extra, layer.keys.shape[3])
            layer.keys, layer.values = torch.cat([pad, layer.keys], dim=2), torch.cat([pad, layer.values], dim=2)
        rows.mask = torch.cat([rows.mask.new_zeros(len(rows.prompt), extra), rows.mask], dim=1)
    extra = seen_columns - rows.seen.shape[1]
    if extra > 0:  # a row's own first token: the set of tokens seen stays the row's own
        rows.seen = torch.cat([rows.seen[:, :1].expand(-1, extra), rows.seen], dim=1)


def join(running: Optional[Rows], new: Rows) -> Rows:
    """One batch of the rows of both, aligned on their newest column."""
    if running is None:
        return new
    columns = max(running.mask.shape[1], new.mask.shape[1])
    seen_columns = max(running.seen.shape[1], new.seen.shape[1])
    for rows in (running, new):
        _left_pad(rows, columns, seen_columns)
    for mine, theirs in zip(running.cache.layers, new.cache.layers):
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
    return Rows(running.cache, torch.cat([running.mask, new.mask]), torch.cat([running.seen, new.seen]),
                torch.cat([running.position, new.position]), torch.cat([running.logits, new.logits]),
                running.prompt + new.prompt)


def decode(engine, model, adapter: str, prompts: list[list[int]], gen, batch_size: int, seed: Optional[int],
           ignore_eos: bool = False, finished: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """The new tokens of every prompt (stop token included), at most `batch_size` rows at a
    time, prompts joining in the given order. `finished(n)` is told as n answers end."""
    from transformers import DynamicCache

    from .generate import left_pad

    device = engine.device
    if seed is not None:
        torch.manual_seed(seed)
    process = engine._logits_processors(gen)
    stop = torch.tensor(engine.stop_ids, device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    running: Optional[Rows] = None
    while waiting or running is not None:
        free = batch_size - (len(running.prompt) if running is not None else 0)
        # join in groups (each join copies the cache): when a quarter of the places are free
        if waiting and (running is None or free >= min(len(waiting), max(1, batch_size // 4))):
            joining, waiting = waiting[:free], waiting[free:]
            group = [prompts[i] for i in joining]
            cache = DynamicCache(config=engine.base.config)
            logits, mask, position = engine._prefill(model, adapter, group, cache)
            ids, present = left_pad(group, 0)
            first = torch.tensor([p[0] for p in group])
            seen = torch.where(present.bool(), ids, first[:, None]).to(device)
            running = join(running, Rows(cache, mask, seen, position, logits[:, -1], joining))
        scores = process(running.seen, running.logits.float())
        if ignore_eos:
            scores[:, stop] = -float("inf")
        if gen.temperature > 0:
            token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        for row, t in zip(running.prompt, token.tolist()):
            answers[row].append(t)
        done = torch.tensor([len(answers[row]) >= gen.max_new_tokens for row in running.prompt], device=device)
        if not ignore_eos:
            done |= torch.isin(token, stop)
        if bool(done.any()):
            if finished:
                finished(int(done.sum()))
            keep = (~done).nonzero().squeeze(1)
            token = token[keep]
            running.select(keep)
            if not len(running.prompt):
                running = None
                continue
            running.trim()
        running.mask = torch.cat([running.mask, running.mask.new_ones(len(token), 1)], dim=1)
        running.seen = torch.cat([running.seen, token[:, None]], dim=1)
        running.position = running.position + 1
        running.logits = engine._logits(model, 1, running.cache, input_ids=token[:, None], attention_mask=running.mask,
                                        position_ids=running.position[:, None])[:, -1]
    return answers
