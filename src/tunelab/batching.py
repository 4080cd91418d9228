"""Continuous batching of requests that arrive over time: the server's decoding loop.

`generate.ring.decode` answers a list of prompts known up front; a server's requests come
and go. Here one worker thread owns the Engine and one `generate.ring.Ring`: a request joins
the running batch as soon as it arrives (prefilled with the others arriving with it, one
prefill per adapter), every step decodes one token for every row, and a row leaves when its
answer ends its turn, reaches its `max_new_tokens`, or its client has gone (`Request.cancel`).
The ring's rows grow as requests arrive (up to `max_rows`) and shrink when half are idle; its
columns widen to the longest request in it (prompt + `max_new_tokens`), so memory and each
step's attention follow the requests, not the limits.

Adapters share one batch:
- LoRA-family weight deltas go through PEFT's mixed-adapter forward (`adapter_names`, one
  a row, `__base__` for none), so rows of several LoRAs and of the base decode in one step;
- virtual-token adapters (P-Tuning, prompt tuning) only change the prefill (their virtual
  tokens are then in the row's keys and values): their decoding steps are the base's, so
  they share the batch too;
- weight deltas PEFT cannot mix in one forward (IA3) are batched per adapter: the batch holds
  one of them at a time, and requests for another wait until it drains;
- prefix tuning places keys and values through its own `generate` only, so it cannot join
  a batch: `Batcher` refuses such an engine.
Tokens are picked per request: the greedy rows in one argmax, a sampled row with its own
generator (seeded by its request), repetition penalty over the row's own tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .config import GenerationConfig
from .generate import BASE, Engine, peft_name
from .generate.ring import Ring
from .generate.static import capacity_for


@dataclass(eq=False)
class Request:
    """One answer being generated. `on_token(id)` is called (in the worker thread) with each
    answer token as it is picked, then `on_token(None)` once the answer has ended: by then
    `finish_reason` is `stop`, `length`, `cancelled` or `error` (with `error` set)."""

    prompt: list[int]
    adapter: str
    gen: GenerationConfig
    on_token: Callable[[Optional[int]], None]
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)  # every generated token, the stop token included
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    submitted: float = field(default_factory=time.perf_counter)
    generator: Optional[torch.Generator] = None  # a sampled request's own random numbers
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating: the row leaves the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Batcher:
    """Decodes every submitted Request in one continuously refilled batch, in a worker thread."""

    def __init__(self, engine: Engine, max_rows: int = 64, max_prompt_tokens: int = 2048,
                 max_new_tokens: int = 512):
        """
        Args:
            engine: the Engine (base and adapters); from now on only the worker thread uses it.
            max_rows: most rows decoded in one step; more requests wait for a place.
            max_prompt_tokens: longest prompt `submit` takes.
            max_new_tokens: largest `gen.max_new_tokens` `submit` takes.
        """
        if engine.prefix:
            raise ValueError(f"prefix-tuning adapters ({sorted(engine.prefix)}) place keys and values "
                             f"through their own generate only, so they cannot share a decoding batch; "
                             f"serve them alone with `tunelab chat --run RUN`")
        self.engine = engine
        self.max_rows, self.max_prompt_tokens, self.max_new_tokens = max_rows, max_prompt_tokens, max_new_tokens
        # PEFT's mixed-adapter forward exists for LoRA (and its variants: DoRA, ...) only
        self.mixes = engine.delta_type in (None, "LORA")
        self.ring = self._empty_ring()
        self.rows: list[Optional[Request]] = []  # the request in each ring place
        self.waiting: list[Request] = []
        self.tokens_generated = 0
        self.steps = 0
        self.mixed_steps = 0  # steps whose rows ran more than one adapter's weights
        self.peak_rows = 0  # most rows decoded in one step
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tunelab-batcher", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ----------------------------------------------------------
    def submit(self, prompt: list[int], adapter: str, gen: GenerationConfig,
               on_token: Callable[[Optional[int]], None], ignore_eos: bool = False) -> Request:
        """Queue `prompt` (rendered ids) for `adapter`; returns its Request at once."""
        self.engine._check_adapter(adapter)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the most is {self.max_prompt_tokens}")
        if not 1 <= gen.max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be 1..{self.max_new_tokens}, got {gen.max_new_tokens}")
        request = Request(list(prompt), adapter, gen, on_token, ignore_eos)
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompt: list[int], adapter: str, gen: GenerationConfig, ignore_eos: bool = False) -> Request:
        """Submit and wait for the whole answer (a blocking helper for scripts and tests)."""
        done = threading.Event()
        request = self.submit(prompt, adapter, gen, lambda t: t is None and done.set(), ignore_eos)
        done.wait()
        return request

    def stats(self) -> dict:
        with self._wake:
            return {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                    "batch_rows": self.ring.rows, "peak_rows": self.peak_rows, "steps": self.steps,
                    "mixed_steps": self.mixed_steps, "tokens_generated": self.tokens_generated,
                    "mixes_adapters": self.mixes}

    def close(self) -> None:
        """Cancel everything and stop the worker thread."""
        with self._wake:
            self._closed = True
            for request in self.waiting + [r for r in self.rows if r is not None]:
                request.cancel()
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not any(self.rows):
                    self._wake.wait()
                if self._closed:
                    joining = []
                else:
                    joining = self._admit()
            if self._closed:
                self._finish_all("cancelled")
                return
            try:
                with torch.no_grad():
                    if joining:
                        self._join(joining)
                    self._leave_cancelled()
                    if any(self.rows):
                        self._step()
            except Exception as err:  # noqa: BLE001 - every request hears of it, the server lives on
                self._finish_all("error", err, joining)

    def _empty_ring(self) -> Ring:
        return Ring(0, capacity_for(1, 1), self.engine.device)

    def _step_adapter(self, adapter: str) -> str:
        """Which weights a decoding step of `adapter` runs: the base's for virtual tokens."""
        return BASE if adapter == BASE or adapter in self.engine.virtual else adapter

    def _admit(self) -> list[Request]:
        """Waiting requests that take a place now (called holding the lock)."""
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        live = [r for r in self.rows if r is not None]
        places = self.max_rows - len(live)
        if self.mixes:
            joining = self.waiting[:places]
        else:  # one weight delta at a time: the batch's, or the first waiting one's
            current = self._step_adapter(live[0].adapter) if live else \
                (self._step_adapter(self.waiting[0].adapter) if self.waiting else None)
            joining = [r for r in self.waiting if self._step_adapter(r.adapter) == current][:places]
        for request in joining:
            self.waiting.remove(request)
        return joining

    def _join(self, joining: list[Request]) -> None:
        from transformers import DynamicCache

        engine, ring = self.engine, self.ring
        live = sum(r is not None for r in self.rows)
        if live + len(joining) > ring.rows:
            ring.grow(min(self.max_rows, max(live + len(joining), 2 * ring.rows)))
            self.rows += [None] * (ring.rows - len(self.rows))
        by_adapter: dict[str, list[Request]] = {}
        for request in joining:
            by_adapter.setdefault(request.adapter, []).append(request)
        for adapter, group in by_adapter.items():  # a group's rows are as wide as its longest
            n_virtual = engine.virtual[adapter].shape[0] if adapter in engine.virtual else 0
            ring.widen(capacity_for(n_virtual + max(len(r.prompt) for r in group),
                                    max(r.gen.max_new_tokens for r in group)))
        free = ring.free()
        for adapter, group in by_adapter.items():
            places, free = free[:len(group)], free[len(group):]
            cache = DynamicCache(config=engine.base.config)
            with engine._serving(adapter) as model:
                logits, mask, position = engine._prefill(model, adapter, [r.prompt for r in group], cache)
            ring.join(places, places, cache, logits[:, -1], mask, position, None)
            with self._wake:
                for place, request in zip(places, group):
                    self.rows[place] = request

    def _leave_cancelled(self) -> None:
        for place, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self._leave(place, "cancelled")
        live = sum(r is not None for r in self.rows)
        if not live:
            with self._wake:
                self.ring = self._empty_ring()  # idle: give the buffers back
                self.rows = []
        elif not self.waiting and live <= self.ring.rows // 2:
            with self._wake:
                self.ring.pack()  # keeps the places in use, in order
                self.rows = [r for r in self.rows if r is not None]

    def _leave(self, place: int, reason: str) -> None:
        self.ring.leave(place)
        with self._wake:
            request, self.rows[place] = self.rows[place], None
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str, error: Optional[BaseException] = None) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason, request.error = reason, error
        request.on_token(None)

    def _finish_all(self, reason: str, error: Optional[BaseException] = None, joining: list = ()) -> None:
        with self._wake:
            pending = [r for r in self.rows if r is not None] + list(joining)
            if self._closed:
                pending += self.waiting
                self.waiting = []
            self.rows = []
            self.ring = self._empty_ring()
        for request in pending:
            self._finish(request, reason, error)

    def _step(self) -> None:
        """Pick every row's next token, hand it over, let ended rows go, run the next forward."""
        engine, ring = self.engine, self.ring
        token = self._pick()
        self.peak_rows = max(self.peak_rows, sum(r is not None for r in self.rows))
        stop = set(engine.stop_ids)
        for place, (request, t) in enumerate(zip(self.rows, token.tolist())):
            if request is None:
                continue
            request.tokens.append(t)
            self.tokens_generated += 1
            if not request.ignore_eos and t in stop:
                self._leave(place, "stop")
                continue
            request.on_token(t)
            if len(request.tokens) >= request.gen.max_new_tokens:
                self._leave(place, "length")
        self.steps += 1
        if not any(self.rows):
            return
        names = [BASE if r is None else self._step_adapter(r.adapter) for r in self.rows]
        in_use = {self._step_adapter(r.adapter) for r in self.rows if r is not None}
        if len(in_use) > 1:  # (only when the engine mixes: `_admit` saw to it)
            self.mixed_steps += 1
            # PEFT's forward routes each row through its own LoRA, whichever adapter is active
            names = ["__base__" if n == BASE else peft_name(n) for n in names]
            ring.step(engine, engine.lora, token, adapter_names=names)
        else:  # one adapter: its plain forward (no per-row routing)
            adapter = in_use.pop()
            if engine.lora is not None and engine.lora.active_adapter == peft_name(adapter):
                ring.step(engine, engine.lora, token)  # (set_adapter walks every module: not each step)
            else:
                with engine._serving(adapter) as model:
                    ring.step(engine, model, token)

    def _pick(self) -> torch.Tensor:
        """Each place's next token from the ring's logits, as `generate` would pick it for its request."""
        engine, logits = self.engine, self.ring.logits
        token = torch.full((self.ring.rows,), engine.tokenizer.pad_token_id or 0, dtype=torch.long,
                           device=logits.device)
        stop = torch.tensor(engine.stop_ids, device=logits.device)
        plain = [p for p, r in enumerate(self.rows) if r is not None and r.gen.temperature == 0
                 and r.gen.repetition_penalty == 1.0]
        if plain:
            index = torch.tensor(plain, device=logits.device)
            scores = logits.index_select(0, index).float()
            blocked = torch.tensor([self.rows[p].ignore_eos for p in plain], device=logits.device)
            scores[blocked[:, None] & torch.isin(torch.arange(scores.shape[1], device=logits.device), stop)[None]] \
                = -float("inf")
            token[index] = scores.argmax(-1)
        plain_places = set(plain)
        for place, request in enumerate(self.rows):
            if request is None or place in plain_places:
                continue
            process = engine._logits_processors(request.gen)
            seen = torch.tensor([request.prompt + request.tokens], device=logits.device)
            scores = process(seen, logits[place:place + 1].float())
            if request.ignore_eos:
                scores[:, stop] = -float("inf")
            if request.gen.temperature > 0:
                if request.generator is None:
                    request.generator = torch.Generator(device=logits.device).manual_seed(request.gen.seed)
                token[place] = torch.multinomial(scores.softmax(-1), 1, generator=request.generator)[0, 0]
            else:
                token[place] = scores.argmax(-1)[0]
        return token
