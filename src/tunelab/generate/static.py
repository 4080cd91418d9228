"""Decoding with fixed buffers, each step replayed as one CUDA graph (the GPU's decoding path).

A decoding step of a 1.5B model on a GPU is a few milliseconds of work for the card but tens
of milliseconds of Python and kernel launches (every layer, every LoRA branch, a growing KV
cache, a new attention mask). Here everything a step reads lives at a fixed address:

- `SlotCache`: the keys and values of every layer in buffers [rows, kv_heads, capacity,
  head_dim] allocated once; a forward writes its tokens at the columns `columns` holds (a
  device tensor, so a captured step writes where the tensor says at replay) and attention
  reads all `capacity` columns, the unused ones masked out;
- the step's inputs (`Slots.token`, `.position`, `.mask`) are tensors updated in place.

So the step (the whole model forward, LoRA branches included) is captured once per
(adapter, rows, capacity) as a `torch.cuda.CUDAGraph` and replayed: one launch a token.
Rows keep their place in the batch until all have ended their turn (a graph has fixed
shapes); a finished row's later tokens are cut off.

The attention mask is 4D and boolean: row b, query i may read column j when j holds one of
its own tokens (its prompt or its answer so far) at or before i. Transformers takes a 4D
mask as given, so no mask is built inside the step. A left-padding position may read
itself, so no query row is fully masked (which would give NaN keys and values to pads).

Attention during these forwards is `static_attention` (registered with transformers as
`tunelab_static`): a decoding step's query heads that share a key/value head are read as
that head's rows, so grouped-query attention never copies the cache per query head (SDPA
with a mask does: on the 1.5B shape that copy was more than half the step).

On a CPU the same steps run without graphs (what the tests compare with the dynamic path).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .prefill import left_pad, shared_prefix_length

ATTENTION = "tunelab_static"


def static_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for transformers' interface: query [batch, heads, q, dim], key and value
    [batch, kv_heads, columns, dim], a boolean mask [batch, 1, q, columns]; returns [batch, q,
    heads, dim]. With one query position, the `heads / kv_heads` query heads of a group become
    that group's query rows, so no key or value is repeated."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if length == 1 and groups > 1:
        out = F.scaled_dot_product_attention(query.reshape(batch, key.shape[1], groups, dim), key, value,
                                             attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def static_attention_in(model):
    """`model` (every sub-model) attends with `static_attention` meanwhile."""
    AttentionInterface.register(ATTENTION, static_attention)
    configs = {id(c): c for m in model.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


class SlotCache:
    """A KV cache of fixed buffers: what the model's attention layers call `update` on."""

    is_compileable = False
    is_sliding = [False]

    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.rows, self.capacity = rows, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.columns = torch.zeros(1, dtype=torch.long, device=device)
        self.width = 0  # columns in use, for get_seq_length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # buffers take their shapes from the first write
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        keys, values = self.keys[layer_idx][:key.shape[0]], self.values[layer_idx][:key.shape[0]]
        keys.index_copy_(2, self.columns, key)
        values.index_copy_(2, self.columns, value)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def __len__(self) -> int:
        return len(self.keys)

    def share_first_row(self, columns: int) -> None:
        """Copy row 0's first `columns` keys and values to every row (a shared prompt prefix)."""
        for buffer in self.keys + self.values:
            buffer[1:, :, :columns] = buffer[:1, :, :columns]


class Slots:
    """A SlotCache and the step's inputs, for one (rows, capacity)."""

    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.cache = SlotCache(rows, capacity, device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.column = self.cache.columns  # the step writes at this column
        self.graphs: dict[str, tuple] = {}  # adapter -> (CUDAGraph, its logits)


class StaticDecoder:
    """Prefill and decoding steps over `Slots`; the steps replayed as CUDA graphs when `graphs`."""

    def __init__(self, engine, graphs: bool, keep: int = 2):
        self.engine = engine
        self.graphs = graphs
        self.keep = keep  # Slots kept (each holds a KV cache of its capacity)
        self.slots: OrderedDict[tuple[int, int], Slots] = OrderedDict()
        self.pool = None

    def clear(self) -> None:
        """Forget every buffer and graph (after the model's modules changed)."""
        self.slots.clear()

    def _slots(self, rows: int, capacity: int) -> Slots:
        key = (rows, capacity)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.keep:
            self.slots.popitem(last=False)
        self.slots[key] = Slots(rows, capacity, self.engine.device)
        return self.slots[key]

    def decode(self, model, adapter: str, prompts: list[list[int]], gen, seed, ignore_eos: bool = False
               ) -> list[list[int]]:
        """`Engine._decode` through these buffers, with `model` serving `adapter` (and attending
        through `static_attention_in`). Every row stays in the batch until all have ended their
        turn (checked every 8 steps); each answer is cut after its first stop token. Tokens
        are picked exactly as in `Engine._decode`."""
        engine, device = self.engine, self.engine.device
        if seed is not None:
            torch.manual_seed(seed)
        process = engine._logits_processors(gen)
        stop = torch.tensor(engine.stop_ids, device=device)
        n_virtual = engine.virtual[adapter].shape[0] if adapter in engine.virtual else 0
        capacity = capacity_for(n_virtual + max(map(len, prompts)), gen.max_new_tokens)
        tokens = torch.empty(len(prompts), gen.max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        slots, logits, column = self.prefill(model, adapter, prompts, capacity)
        seen = None
        if len(process):  # repetition penalty: each row's tokens, left-padded with its own first token
            ids, present = left_pad(prompts, 0)
            seen = torch.where(present.bool(), ids, ids[torch.arange(len(prompts)), -present.sum(1)][:, None]).to(device)
        steps = 0
        for step in range(gen.max_new_tokens):
            token = pick(logits, seen, process, gen, stop, ignore_eos)
            tokens[:, step] = token
            steps = step + 1
            if not ignore_eos:
                finished |= torch.isin(token, stop)
            if steps == gen.max_new_tokens or (not ignore_eos and steps % 8 == 0 and bool(finished.all())):
                break
            if seen is not None:
                seen = torch.cat([seen, token[:, None]], dim=1)
            logits = self.step(model, adapter, slots, token, column + step)
        answers = tokens[:, :steps].tolist()
        if ignore_eos:
            return answers
        stops = set(engine.stop_ids)
        return [next((a[:n + 1] for n, t in enumerate(a) if t in stops), a) for a in answers]

    def prefill(self, model, adapter: str, prompts: list[list[int]], capacity: int) -> tuple[Slots, torch.Tensor, int]:
        """Run the prompts into a Slots' cache; returns it, the last position's logits [rows,
        vocab] and the first free column. The prompts' shared beginning (after the adapter's
        virtual tokens) is computed once, as in `Engine._prefill`."""
        engine, device = self.engine, self.engine.device
        slots = self._slots(len(prompts), capacity)
        cache = slots.cache
        shared = shared_prefix_length(prompts)
        head = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
        held = shared
        if adapter in engine.virtual:
            embeds = engine.base.get_input_embeddings()(head)
            embeds = torch.cat([engine.virtual[adapter][None].to(embeds.dtype), embeds], dim=1)
            held = embeds.shape[1]
            inputs = {"inputs_embeds": embeds}
        else:
            inputs = {"input_ids": head}
        columns = torch.arange(capacity, device=device)
        if held:
            cache.columns = columns[:held]
            causal = columns[None, :] <= columns[:held, None]  # [held, capacity]
            engine._logits(model, 1, cache, attention_mask=causal[None, None], position_ids=columns[None, :held],
                           **inputs)
            cache.share_first_row(held)
        ids, mask = left_pad([p[shared:] for p in prompts], engine.tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device).bool()
        width = held + ids.shape[1]
        valid = torch.zeros(len(prompts), capacity, dtype=torch.bool, device=device)
        valid[:, :held] = True
        valid[:, held:width] = mask
        queries = columns[held:width]
        allowed = valid[:, None, :] & (columns[None, None, :] <= queries[None, :, None])
        allowed |= columns[None, None, :] == queries[None, :, None]  # a pad reads itself: never all masked
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, held:width]
        cache.columns = columns[held:width]
        cache.width = width
        logits = engine._logits(model, 1, cache, input_ids=ids, attention_mask=allowed[:, None],
                                position_ids=positions)[:, -1]
        cache.columns = slots.column
        slots.mask.copy_(valid[:, None, None, :])
        slots.position.copy_(positions[:, -1:])
        return slots, logits, width

    def step(self, model, adapter: str, slots: Slots, token: torch.Tensor, column: int) -> torch.Tensor:
        """One decoding step: `token` [rows] goes in at `column`; the next logits [rows, vocab]."""
        slots.token.copy_(token[:, None])
        slots.position.add_(1)
        slots.column.fill_(column)
        slots.mask[:, 0, 0, column] = True
        slots.cache.width = column + 1
        if not self.graphs:
            return self._forward(model, slots)[:, -1]
        if adapter not in slots.graphs:
            try:
                slots.graphs[adapter] = self._capture(model, slots)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - e.g. a layer that syncs with the host: go eager
                self.graphs = False
                warnings.warn(f"CUDA graph capture of a decoding step failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); decoding continues eagerly")
                torch.cuda.synchronize()
                return self._forward(model, slots)[:, -1]
            return slots.graphs[adapter][1][:, -1]  # the capture's warm-up step computed it
        graph, logits = slots.graphs[adapter]
        graph.replay()
        return logits[:, -1]

    def _forward(self, model, slots: Slots) -> torch.Tensor:
        return self.engine._logits(model, 1, slots.cache, input_ids=slots.token, attention_mask=slots.mask,
                                   position_ids=slots.position)

    def _capture(self, model, slots: Slots) -> tuple:
        """Run the step once eagerly (a real step: it is this step's result), then capture it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = self._forward(model, slots)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(model, slots)
        logits.copy_(warm)  # capturing ran nothing: the warm-up's logits are this step's
        return graph, logits


def pick(logits: torch.Tensor, seen, process, gen, stop: torch.Tensor, ignore_eos: bool) -> torch.Tensor:
    """Each row's next token as `generate` picks it: the logits processors (repetition penalty
    over `seen`, sampling warpers), then argmax or a sample; with `ignore_eos` never a stop token."""
    scores = process(seen, logits.float()) if seen is not None else logits.float()
    if ignore_eos:
        scores[:, stop] = -float("inf")
    if gen.temperature > 0:
        return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
    return scores.argmax(-1)


def capacity_for(width: int, max_new_tokens: int, multiple: int = 64) -> int:
    """Columns a batch needs (prompt width + new tokens), rounded up so batches share buffers."""
    need = width + max_new_tokens
    return -(-need // multiple) * multiple


def decodable(model) -> bool:
    """Whether the static path fits the model: every layer full attention with a standard cache."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types) and not getattr(config, "is_encoder_decoder", False)


