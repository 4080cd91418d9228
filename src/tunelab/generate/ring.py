"""Decoding with a batch that refills itself (continuous batching): the CPU's decoding path.

A CPU decoding step of a small model costs a fixed part (every weight read once) plus a part
per row (docs/PERFORMANCE.md). A batch that
waits for its longest answer pays the fixed part for a few rows at its end. Here a row that
ends its turn frees its place at once and a waiting prompt takes it, so the batch stays full
until the prompts run out; then the rows still answering are packed into a smaller batch.

The keys and values live in fixed buffers (`static.SlotCache`) used as a ring of
`capacity` columns: every step writes each row's new token at the ring's next column, so
nothing is copied as the answers grow (a growing cache copies itself at every step). Which
columns are a row's own is in its mask row; attention ignores the order of columns (keys
carry their positions already), so a row may wrap around the ring. A prompt joins by being
prefilled with the others joining (their shared beginning once, `Engine._prefill`) and
written into its place at the columns just before the next one; capacity (longest prompt +
`max_new_tokens`) guarantees the ring never reaches a column a living row still owns.
Positions come from each row's own count, so every row has the positions it has alone.
Tokens are picked as `generate` picks them: argmax, or the same logits processors and
sampling; with `ignore_eos` the stop tokens are never picked.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers import DynamicCache

from .static import SlotCache, capacity_for, pick, static_attention_in


class Ring:
    """The batch's places: a SlotCache of `rows` x `capacity` columns, each row's mask,
    position, next-token logits and tokens seen, and which prompt each place answers."""

    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.rows, self.capacity, self.device = rows, capacity, device
        self.cache = SlotCache(rows, capacity, device)
        self.cache.width = capacity
        self.mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        self.logits: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # [rows, n], left-padded with each row's first token
        self.owner = [-1] * rows  # prompt index of each place, -1: free
        self.next = 0  # the column the next step writes

    def free(self) -> list[int]:
        return [r for r, owner in enumerate(self.owner) if owner < 0]

    def live(self) -> int:
        return sum(owner >= 0 for owner in self.owner)

    def join(self, places: list[int], owners: list[int], cache, logits: torch.Tensor, mask: torch.Tensor,
             position: torch.Tensor, prompts: Optional[list[list[int]]]) -> None:
        """Put prefilled rows (a DynamicCache `cache`, their mask, last positions, next-token
        logits) into `places`, at the columns just before `next`."""
        width = mask.shape[1]
        columns = (self.next - width + torch.arange(width, device=self.device)) % self.capacity
        rows = torch.tensor(places, device=self.device)
        if not self.cache.keys:  # buffers take their shapes from the first prefill
            for layer in cache.layers:
                shape = (self.rows, layer.keys.shape[1], self.capacity, layer.keys.shape[3])
                self.cache.keys.append(layer.keys.new_zeros(shape))
                self.cache.values.append(layer.values.new_zeros(shape))
            self.logits = logits.new_zeros(self.rows, logits.shape[-1])
        where = (rows[:, None], slice(None), columns[None, :])
        for keys, values, layer in zip(self.cache.keys, self.cache.values, cache.layers):
            keys[where] = layer.keys.permute(0, 2, 1, 3)
            values[where] = layer.values.permute(0, 2, 1, 3)
        self.mask[rows] = False
        self.mask[rows[:, None], columns[None, :]] = mask.bool()
        self.position[rows] = position
        self.logits[rows] = logits
        if prompts is not None:  # repetition penalty: the tokens each row has seen
            longest = max(self.seen.shape[1] if self.seen is not None else 0, max(map(len, prompts)))
            self.seen = _left_fill(self.seen, longest) if self.seen is not None else \
                torch.zeros(self.rows, longest, dtype=torch.long, device=self.device)
            for place, prompt in zip(places, prompts):
                ids = torch.tensor(prompt, device=self.device)
                self.seen[place] = torch.cat([ids[:1].expand(longest - len(prompt)), ids])
        for place, owner in zip(places, owners):
            self.owner[place] = owner

    def leave(self, place: int) -> None:
        self.owner[place] = -1
        self.mask[place] = False  # a free place reads only the column it writes: never NaN

    def grow(self, rows: int) -> None:
        """Add free places up to `rows` (a server's batch grows as requests arrive)."""
        extra = rows - self.rows
        if extra <= 0:
            return
        self.cache.keys = [torch.cat([k, k.new_zeros((extra,) + k.shape[1:])]) for k in self.cache.keys]
        self.cache.values = [torch.cat([v, v.new_zeros((extra,) + v.shape[1:])])
                             for v in self.cache.values]
        self.mask = torch.cat([self.mask, self.mask.new_zeros(extra, self.capacity)])
        self.position = torch.cat([self.position, self.position.new_zeros(extra)])
        if self.logits is not None:
            self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(extra, self.seen.shape[1])])
        self.owner += [-1] * extra
        self.rows = self.cache.rows = rows

    def widen(self, capacity: int) -> None:
        """Add free columns at the ring's end, for a longer request. The rows already here keep
        their guarantee: each ends before its writes reach its own first column, which lies
        below the old capacity, so the new columns only give them more room."""
        extra = capacity - self.capacity
        if extra <= 0:
            return

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[:2] + (extra,) + t.shape[3:])], dim=2)

        self.cache.keys = [pad(k) for k in self.cache.keys]
        self.cache.values = [pad(v) for v in self.cache.values]
        self.mask = torch.cat([self.mask, self.mask.new_zeros(self.rows, extra)], dim=1)
        self.capacity = self.cache.capacity = self.cache.width = capacity

    def pack(self) -> None:
        """Keep only the places in use (the prompts have run out)."""
        keep = torch.tensor([r for r, owner in enumerate(self.owner) if owner >= 0], device=self.device)
        self.cache.keys = [k.index_select(0, keep) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, keep) for v in self.cache.values]
        self.mask, self.position, self.logits = (t.index_select(0, keep) for t in (self.mask, self.position,
                                                                                   self.logits))
        if self.seen is not None:
            self.seen = self.seen.index_select(0, keep)
        self.owner = [self.owner[r] for r in keep.tolist()]
        self.rows = self.cache.rows = len(self.owner)

    def step(self, engine, model, token: torch.Tensor, **inputs) -> None:
        """Feed each place its token at column `next`; the next-token logits replace `logits`.
        `inputs` go to the model's forward too (a server's `adapter_names`, one a row)."""
        column = self.next
        self.mask[:, column] = True
        self.cache.columns = torch.tensor([column], device=self.device)
        self.position += 1
        if self.seen is not None:
            self.seen = torch.cat([self.seen, token[:, None]], dim=1)
        with static_attention_in(engine.base):
            self.logits = engine._logits(model, 1, self.cache, input_ids=token[:, None],
                                         attention_mask=self.mask[:, None, None, :],
                                         position_ids=self.position[:, None], **inputs)[:, -1]
        self.next = (column + 1) % self.capacity


def _left_fill(seen: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - seen.shape[1]
    return seen if extra <= 0 else torch.cat([seen[:, :1].expand(-1, extra), seen], dim=1)


def decode(engine, model, adapter: str, prompts: list[list[int]], gen, batch_size: int, seed: Optional[int],
           ignore_eos: bool = False, finished: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """The new tokens of every prompt (stop token included), at most `batch_size` rows at a
    time, prompts joining in the given order. `finished(n)` is told as n answers end."""
    device = engine.device
    if seed is not None:
        torch.manual_seed(seed)
    process = engine._logits_processors(gen)
    stop = set(engine.stop_ids)
    stop_ids = torch.tensor(engine.stop_ids, device=device)
    n_virtual = engine.virtual[adapter].shape[0] if adapter in engine.virtual else 0
    ring = Ring(min(batch_size, len(prompts)), capacity_for(n_virtual + max(map(len, prompts)), gen.max_new_tokens),
                device)
    answers: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    while True:
        free = ring.free()
        # prompts join in groups (each group is one prefill): once a quarter of the places are free
        if waiting and free and len(free) >= min(len(waiting), max(1, ring.rows // 4)):
            joining, waiting = waiting[:len(free)], waiting[len(free):]
            group = [prompts[i] for i in joining]
            cache = DynamicCache(config=engine.base.config)
            logits, mask, position = engine._prefill(model, adapter, group, cache)
            ring.join(free[:len(joining)], joining, cache, logits[:, -1], mask, position,
                      group if len(process) else None)
        elif not waiting and ring.live() <= ring.rows // 2 and ring.live():
            ring.pack()  # the last answers: no more places than rows
        token = pick(ring.logits, ring.seen, process, gen, stop_ids, ignore_eos)
        ended = 0
        for place, t in enumerate(token.tolist()):
            owner = ring.owner[place]
            if owner < 0:
                continue
            answers[owner].append(t)
            if len(answers[owner]) >= gen.max_new_tokens or (not ignore_eos and t in stop):
                ring.leave(place)
                ended += 1
        if ended and finished:
            finished(ended)
        if not waiting and not ring.live():
            return answers
        ring.step(engine, model, token)
