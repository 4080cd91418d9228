"""Batched generation shared by chat, evaluation and serving.

Prompts are rendered by `ChatFormat` (the same function training uses), taken shortest
first, left-padded into batches and decoded with a KV cache until the template's end-of-turn
token, never through a model-specific chat helper. `complete` decodes by a short loop over
the model's forward that does what `generate` does, plus: the prompts' shared beginning
(system prompt, template header) is computed once per batch; on a CPU a row leaves the batch
once it has ended its turn and a waiting prompt takes its place (`ring.py`); on a
GPU every step is one CUDA graph over fixed buffers (`static.py`). Streaming (chat)
and prefix tuning go through the model's own `generate`.

One base model stays in memory and several adapters share it, switched by name:
- `base`: the model alone (weight-delta adapters disabled);
- weight-delta adapters (LoRA and its family): all live in one PEFT model, which switches
  between them with `set_adapter` and turns them off with `disable_adapter`;
- virtual tokens that are input embeddings (P-Tuning, prompt tuning): the prompt encoder's
  input is a fixed range of indices, so at inference the adapter is a fixed
  [n_virtual, hidden] block of input embeddings. It is computed once when the adapter is
  added (through the method's own `load`, around the same base module: PEFT's wrapper keeps
  a reference to the base and adds only its encoder, so no weight is copied) and placed
  before each prompt, after the left padding, so a padded row has exactly the positions
  0..n+L-1 it has alone. Weight deltas are disabled meanwhile.
- prefix tuning (keys and values in every layer): its PEFT model, loaded around the same
  base, generates with the weight deltas disabled (its `generate`, methods/virtual_tokens.py,
  gives padded rows their unpadded positions too).
What cannot share: weight deltas of two PEFT types (LoRA and IA3), and a run that replaced
the base's own weights (freeze, full), which an engine holds alone, as its model under the
run's name. `evaluate.runner.engine_groups` partitions runs into engines by the methods'
declared `adapter_kind` and `peft_type`; evaluation takes the groups in turn.
PEFT's own `generate` is not used for virtual tokens: under transformers 5.2x it re-inserts
them at every decoding step, and with left padding it shifts every real token's position.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from peft import PeftModel

from ..config import GenerationConfig
from ..data.template import ChatFormat
from ..methods import get
from ..methods.virtual_tokens import virtual_token_embeddings
from ..models import load_model, load_tokenizer
from ..runs import RunDir, check_adapter, check_adapter_files, check_base, run_model_config
from . import ring
from .prefill import left_pad, shared_prefix_length
from .static import StaticDecoder, decodable, static_attention_in

BASE = "base"
# PEFT keeps adapters in nn.ModuleDicts, whose keys may not contain "."; a run or label named
# "lora-v1.5" is still a fine name, so the engine hands PEFT this stand-in for each dot.
_DOT = "\u2024"


def peft_name(name: str) -> str:
    """The name PEFT knows an engine adapter by."""
    return name.replace(".", _DOT)


def engine_name(key: str) -> str:
    """The engine's name for the PEFT adapter `key` (`peft_name` undone)."""
    return key.replace(_DOT, ".")
"""The adapter name that means: the base model alone."""


class Engine:
    """Answers conversations with one base model and any of the adapters added to it."""

    def __init__(self, model, tokenizer, device: Optional[torch.device] = None):
        """`model` is a plain model or a PEFT model with one adapter (what `load_run` returns);
        a PEFT model's adapter becomes the active one, under its PEFT name."""
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.base = model
        self.lora = None  # the PEFT model holding every weight-delta adapter, once there is one
        self.delta_type: Optional[str] = None  # their PEFT type (a method's declared `peft_type`)
        self.virtual: dict[str, torch.Tensor] = {}  # name -> [n_virtual, hidden] input embeddings
        self.prefix: dict = {}  # name -> its prefix-tuning PEFT model around `self.base`
        self.active = BASE
        self.plain = BASE  # the name the model alone answers to: `base`, or a whole-model run's
        self.model_path: Optional[str] = None  # the base's --model.path, when known
        self.model_cfg = None  # the base's ModelConfig, when known (checks a run trained elsewhere)
        self.device = device or next(model.parameters()).device
        if _is_peft(model):
            name = engine_name(model.active_adapter)
            self.base = model.get_base_model()
            # No method is named here, so the model handed in says what it holds.
            if not model.active_peft_config.is_prompt_learning:
                self.lora = model
                self.delta_type = model.active_peft_config.peft_type.value
            else:
                self._keep_prompt(name, model)
            self.active = name
        self.base.eval()
        if self.device.type == "cpu":
            column_major_weights(self.base)
        self.stop_ids = self._stop_ids()
        # transformers >= 5.2x names the KV cache argument `cache`, earlier versions `past_key_values`
        accepted = inspect.signature(self.base.forward).parameters
        self.cache_name = "cache" if "cache" in accepted else "past_key_values"
        self.keeps_logits = "logits_to_keep" in accepted  # else the head runs on every position
        # On a GPU, batches decode through fixed buffers, each step one CUDA graph (static.py)
        self.static = self.device.type == "cuda" and decodable(self.base)
        self.decoder = StaticDecoder(self, graphs=self.device.type == "cuda")

    # -- adapters ---------------------------------------------------------------------------
    @classmethod
    def from_runs(cls, runs: dict[str, Union[str, Path]], model=None,
                  device: Optional[torch.device] = None,
                  tokenizer: Optional[Union[str, Path]] = None) -> "Engine":
        """One base in memory with each run's adapter under its name (`runs={"lora": dir}`),
        or one run that replaced the base's weights (freeze, full), alone, under its name.

        Args:
            runs: adapter name -> run directory; every run must be trained on the same base.
            model: the base's ModelConfig (default: the first run's). With no runs, needed.
            device: where the model lives (default: the config's device).
            tokenizer: a tokenizer directory (default: the first run's, which carries the chat
                template the runs were trained with; with no runs, the model's).
        """
        from transformers import AutoTokenizer

        if model is None:
            if not runs:
                raise ValueError("Engine.from_runs needs runs or a base model config")
            first = RunDir(next(iter(runs.values())))
            model = run_model_config(first, first.read_config())  # a moved base: a clear error
        if tokenizer is None and runs:  # the runs' tokenizer carries the chat template they were trained with
            tokenizer = RunDir(Path(next(iter(runs.values())))).tokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer is not None else load_tokenizer(model)
        engine = cls(load_model(model, device), tokenizer, device)
        engine.model_path = model.path
        engine.model_cfg = model
        for name, run in runs.items():
            engine.add_adapter(name, run)
        return engine

    @property
    def adapters(self) -> list[str]:
        """Names usable as `adapter=`: `base` (a whole-model run's name instead, once its weights
        replaced the base's), then every added adapter."""
        deltas = [engine_name(k) for k in self.lora.peft_config] if self.lora is not None else []
        return [self.plain] + deltas + list(self.virtual) + list(self.prefix)

    def add_adapter(self, name: str, run: Union[str, Path]) -> None:
        """Load a finished run's adapter onto the base, under `name` (weights are not reloaded);
        a freeze or full run's weights replace the base's, on an engine holding nothing else."""
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is taken (names in use: {self.adapters})")
        run_dir = RunDir(Path(run))
        config = run_dir.read_config()
        if not run_dir.adapter.is_dir():
            raise FileNotFoundError(f"{run_dir.root} has no adapter/ yet: the run has not finished")
        check_adapter_files(run_dir.adapter)  # every run's: safetensors only, whole files
        trained_on = (config.get("model") or {}).get("path")
        if self.model_path and trained_on and trained_on != self.model_path:
            # Another path may hold the same model (moved, or `--model.path` pointing at it):
            # compared by fingerprint; another model is refused, as an adapter fits its own base only.
            if self.model_cfg is None:
                raise ValueError(f"run {run_dir.root} was trained on {trained_on!r}, but this engine's "
                                 f"base is {self.model_path!r}: an adapter only fits its own base")
            check_base(run_dir, self.model_cfg)
        if self.lora is None:  # (its shape check reads un-injected modules; later, PEFT's load checks)
            check_adapter(run_dir.adapter, self.base)  # another base's adapter is refused here
        method = get(config["method"]["name"])
        if self.plain != BASE:
            raise ValueError(f"this engine's model is run {self.plain!r}'s own weights, not the base, so "
                             f"{name!r} cannot join it; give it an Engine of its own")
        kind = method.capabilities.adapter_kind
        if kind == "whole_model" and self.adapters != [BASE]:
            raise ValueError(f"{method.name} training changes the base weights themselves, so its run "
                             f"cannot share a base with others; load it alone (`Engine.from_runs({{{name!r}: "
                             f"run}})`, `tunelab chat --run {run_dir.root}`)")
        if kind == "whole_model":
            self._replace_base_weights(name, method, run_dir.adapter)
        elif kind == "weight_delta":
            self._add_weight_delta(name, method, run_dir.adapter)
        else:
            self._add_virtual_tokens(name, method, run_dir.adapter)
        self.base.eval()
        if self.device.type == "cpu":
            column_major_weights(self.base)
        self.decoder.clear()  # graphs captured before hold the modules of before

    def _add_weight_delta(self, name: str, method, adapter: Path) -> None:
        """Weight deltas of one PEFT type (the method's declared `peft_type`) share the injected
        layers of one PEFT model."""
        kind = method.capabilities.peft_type
        if self.lora is None:
            self.lora = PeftModel.from_pretrained(self.base, str(adapter), adapter_name=peft_name(name))
            self.delta_type = kind
            return
        if kind != self.delta_type:
            raise ValueError(f"this engine holds {self.delta_type} adapters and PEFT cannot switch between "
                             f"those and {kind} on one model; use a second Engine for {name!r}")
        self.lora.load_adapter(str(adapter), adapter_name=peft_name(name))

    def _replace_base_weights(self, name: str, method, adapter: Path) -> None:
        """The run's weights go into the base in place; the engine then serves them as `name`
        and no longer has a base (there is one copy of the weights in memory)."""
        method.load(self.base, adapter, False)
        self.plain = self.active = name

    def _add_virtual_tokens(self, name: str, method, adapter: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "modifying a model with PEFT a second time"
            wrapped = method.load(self.base, adapter, False)
        config = getattr(wrapped, "active_peft_config", None)
        if config is None or not config.is_prompt_learning or wrapped.get_base_model() is not self.base:
            raise ValueError(f"method {method.name!r} declares adapter_kind "
                             f"{method.capabilities.adapter_kind!r}, but its loaded adapter is not virtual "
                             f"tokens on the same base, so it cannot share the Engine's base; load it alone")
        self._keep_prompt(name, wrapped)

    def _keep_prompt(self, name: str, wrapped) -> None:
        prompt = virtual_token_embeddings(wrapped)
        if prompt is None:  # a prefix: keys and values, only its own forward can place them
            self.prefix[name] = wrapped.eval()
        else:
            self.virtual[name] = prompt.to(self.device)

    def use(self, name: str) -> None:
        """Make `name` the adapter used when `adapter=` is not given."""
        self._check_adapter(name)
        self.active = name

    def _check_adapter(self, name: str) -> str:
        """`name`, or BASE for the model alone (under whatever name it answers to)."""
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this engine has {self.adapters}")
        return BASE if name == self.plain else name

    def _deltas_off(self):
        return self.lora.disable_adapter() if self.lora is not None else nullcontext()

    # -- generation -------------------------------------------------------------------------
    def _stop_ids(self) -> list[int]:
        # The template's end of turn first; eos too when it differs, since some checkpoints
        # were trained to emit it (never eos alone: GGUF tokenizers disagree on what it is).
        ids = [self.format.end_of_turn_id]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def _generate_kwargs(self, gen: GenerationConfig, ignore_eos: bool = False) -> dict:
        sample = gen.temperature > 0
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=sample,
                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=gen.repetition_penalty)
        if ignore_eos:  # benchmarks: every row does the same amount of work
            kwargs["min_new_tokens"] = gen.max_new_tokens
        if sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
        else:  # silence the model's generation_config sampling defaults under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, adapter: str, seed: Optional[int],
             **kwargs) -> torch.Tensor:
        """Generate from left-padded `ids` with `adapter`; returns only the new tokens."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        if seed is not None:
            torch.manual_seed(seed)
        if adapter in self.virtual:
            ids, mask, embeds = self._with_virtual_tokens(ids, mask, self.virtual[adapter])
            with self._deltas_off():
                out = self.base.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
        elif adapter in self.prefix:
            with self._deltas_off():
                out = self.prefix[adapter].generate(input_ids=ids, attention_mask=mask, **kwargs)
        elif adapter == BASE:
            with self._deltas_off():
                out = self.base.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            self.lora.set_adapter(peft_name(adapter))
            out = self.lora.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out[:, ids.shape[1]:]

    def _with_virtual_tokens(self, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor):
        """Insert the virtual tokens between each row's left padding and its prompt.

        Their input_ids slots hold the row's own first token: generate() only reads them
        for repetition penalties, which then see exactly the prompt's tokens.
        """
        n, width = prompt.shape[0], ids.shape[1]
        lengths = mask.sum(dim=1)
        rows = []
        for row, length in zip(ids, lengths.tolist()):
            pad = width - length
            rows.append(torch.cat([row[:pad], row[pad:pad + 1].expand(n), row[pad:]]))
        new_ids = torch.stack(rows)
        new_mask = (torch.arange(n + width, device=ids.device)[None, :] >= (width - lengths)[:, None]).long()
        embeds = self.base.get_input_embeddings()(new_ids)
        for b, length in enumerate(lengths.tolist()):
            start = width - length
            embeds[b, start:start + n] = prompt.to(embeds.dtype)
        return new_ids, new_mask, embeds

    @contextmanager
    def _serving(self, adapter: str):
        """The module to call for `adapter` (not a prefix), with that adapter switched on."""
        if adapter in self.virtual or adapter == BASE:
            with self._deltas_off():
                yield self.base
        else:
            self.lora.set_adapter(peft_name(adapter))
            yield self.lora

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, adapter: Optional[str] = None,
                keep_last: int = 0) -> torch.Tensor:
        """Teacher-forced logits [batch, width, vocab] of left-padded `ids` with `adapter`, in
        the layout of `ids` (virtual positions removed); each row has its unpadded positions.

        keep_last > 0: only the logits of the last `keep_last` positions, [batch, keep_last,
        vocab] (the LM head is the costliest layer of a small model; scoring needs few positions).
        """
        adapter = self._check_adapter(adapter or self.active)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if adapter in self.virtual:
            n, width = self.virtual[adapter].shape[0], ids.shape[1]
            _, full_mask, embeds = self._with_virtual_tokens(ids, mask, self.virtual[adapter])
            with self._deltas_off():
                logits = self._logits(self.base, keep_last, inputs_embeds=embeds, attention_mask=full_mask,
                                      position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
            if keep_last:  # the virtual tokens sit before each row's first token, never after it
                return logits
            pads = (width - mask.sum(-1)).tolist()
            return torch.stack([torch.cat([row[:pad], row[pad + n:]]) for row, pad in zip(logits, pads)])
        if adapter in self.prefix:  # PEFT shifts position_ids past the prefix itself
            with self._deltas_off():
                return self._logits(self.prefix[adapter], keep_last, input_ids=ids, attention_mask=mask,
                                    position_ids=positions)
        with self._serving(adapter) as model:
            return self._logits(model, keep_last, input_ids=ids, attention_mask=mask, position_ids=positions)

    def logits(self, ids: list[int], adapter: Optional[str] = None) -> torch.Tensor:
        """Next-token logits [len(ids), vocab] for one unpadded prompt (virtual tokens excluded)."""
        batch = torch.tensor([ids])
        return self.forward(batch, torch.ones_like(batch), adapter)[0].float()

    @torch.no_grad()
    def complete(self, prompts: list[list[int]], gen: Optional[GenerationConfig] = None,
                 batch_size: int = 16, adapter: Optional[str] = None, progress: bool = False,
                 ignore_eos: bool = False) -> list[list[int]]:
        """The new token ids for each prompt (already rendered ids), cut before the stop token.

        Prompts are taken shortest first. On a CPU, one batch of at most `batch_size` rows
        refills itself as answers end (ring.py); on a GPU, batches of `batch_size`
        decode through fixed buffers and CUDA graphs (static.py). Sampled decoding is
        reproducible: the same prompts, batch size and device give the same answers.
        """
        gen = gen or GenerationConfig()
        shown = adapter or self.active
        adapter = self._check_adapter(shown)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
        answers: list[list[int]] = [[] for _ in prompts]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc=f"generate ({shown})", dynamic_ncols=True)
        was_training = self.base.training
        self.base.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG untouched
                if adapter in self.prefix or self.static:
                    new = []
                    for batch_index, start in enumerate(range(0, len(order), batch_size)):
                        batch = [prompts[i] for i in order[start:start + batch_size]]
                        seed = gen.seed + batch_index if gen.temperature > 0 else None
                        new += self._decode(batch, adapter, gen, seed, ignore_eos)
                        if bar:
                            bar.update(len(batch))
                else:
                    seed = gen.seed if gen.temperature > 0 else None
                    with self._serving(adapter) as model:
                        new = ring.decode(self, model, adapter, [prompts[i] for i in order], gen,
                                                    batch_size, seed, ignore_eos, bar.update if bar else None)
                for row, i in enumerate(order):
                    answers[i] = new[row] if ignore_eos else self.cut_at_stop(new[row])
        finally:
            self.base.train(was_training)
            if bar:
                bar.close()
        return answers

    def _prefill(self, model, adapter: str, prompts: list[list[int]], cache, keep_last: int = 1,
                 shared_at_most: Optional[int] = None):
        """Run `prompts` through `model` (serving `adapter`) into `cache`: the logits of the last
        `keep_last` positions (prompts right-aligned), the attention mask, each row's last position.

        The prompts' shared beginning (the system prompt and the template's header, the same
        for a whole suite), after the adapter's virtual tokens, is computed once and its keys
        and values copied to every row; each row's rest is left-padded *after* it, and positions
        come from the mask, so every row has the positions it has alone. Positions inside the
        shared part get no logits: `shared_at_most` keeps the ones the caller reads out of it.
        """
        shared = shared_prefix_length(prompts)
        if shared_at_most is not None:
            shared = max(0, min(shared, shared_at_most))
        head = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=self.device)
        if adapter in self.virtual:
            embeds = self.base.get_input_embeddings()(head)
            embeds = torch.cat([self.virtual[adapter][None].to(embeds.dtype), embeds], dim=1)
            self._logits(model, 1, cache, inputs_embeds=embeds)
        elif shared:
            self._logits(model, 1, cache, input_ids=head)
        held = cache.get_seq_length()
        cache.batch_repeat_interleave(len(prompts))
        ids, mask = left_pad([p[shared:] for p in prompts], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        mask = torch.cat([mask.new_ones(len(prompts), held), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, held:]
        logits = self._logits(model, keep_last, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        return logits, mask, positions[:, -1]

    def _logits(self, model, keep_last: int = 0, cache=None, **inputs) -> torch.Tensor:
        """`model(**inputs).logits`, of the last `keep_last` positions only when > 0 (the LM
        head skips the others where the model allows), reading and extending `cache`."""
        if cache is not None:
            inputs.update({self.cache_name: cache, "use_cache": True})
        if keep_last and self.keeps_logits:
            inputs["logits_to_keep"] = keep_last
        logits = model(**inputs).logits
        return logits[:, -keep_last:] if keep_last else logits

    @torch.no_grad()
    def last_logits(self, prompts: list[list[int]], keep_last: int, adapter: Optional[str] = None,
                    shared_at_most: Optional[int] = None) -> torch.Tensor:
        """Teacher-forced logits [batch, keep_last, vocab] of each prompt's last `keep_last`
        positions, prompts right-aligned (the layout of `forward` on `left_pad(prompts)`), with
        the shared beginning computed once (see `_prefill`; no logits inside it, so give
        `shared_at_most` below the first position you read). Scoring uses it."""
        from transformers import DynamicCache

        adapter = self._check_adapter(adapter or self.active)
        if adapter in self.prefix:  # its keys and values come first: no shared cache before them
            ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
            return self.forward(ids, mask, adapter, keep_last)
        with self._serving(adapter) as model:
            cache = DynamicCache(config=self.base.config)
            return self._prefill(model, adapter, prompts, cache, keep_last, shared_at_most)[0]

    def _decode(self, prompts: list[list[int]], adapter: str, gen: GenerationConfig, seed: Optional[int],
                ignore_eos: bool = False) -> list[list[int]]:
        """The new tokens of one batch of prompts (stop token included): through fixed buffers
        and CUDA graphs (static.py), or, for prefix tuning, its own `generate`."""
        if adapter in self.prefix:  # its keys and values: only its own generate places them
            ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
            return self._run(ids, mask, adapter, seed, **self._generate_kwargs(gen, ignore_eos)).tolist()
        with self._serving(adapter) as model, static_attention_in(self.base):
            return self.decoder.decode(model, adapter, prompts, gen, seed, ignore_eos)

    def _logits_processors(self, gen: GenerationConfig):
        """What `generate` applies to the logits before picking a token, in its order."""
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        processors = LogitsProcessorList()
        if gen.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
        if gen.temperature > 0:
            if gen.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(gen.temperature))
            if gen.top_k:
                processors.append(TopKLogitsWarper(gen.top_k))
            if gen.top_p < 1.0:
                processors.append(TopPLogitsWarper(gen.top_p))
        return processors

    def generate(self, conversations: list[list[dict]], gen: Optional[GenerationConfig] = None,
                 batch_size: int = 16, progress: bool = False, adapter: Optional[str] = None) -> list[str]:
        """One answer per conversation (each a list of role/content messages)."""
        prompts = [self.format.prompt_ids(messages) for messages in conversations]
        answers = self.complete(prompts, gen, batch_size, adapter, progress)
        return [self.decode(ids) for ids in answers]

    def cut_at_stop(self, ids: list[int]) -> list[int]:
        for n, token in enumerate(ids):
            if token in self.stop_ids:
                return ids[:n]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.cut_at_stop(ids), skip_special_tokens=True).strip()

    def stream(self, messages: list[dict], gen: Optional[GenerationConfig] = None,
               adapter: Optional[str] = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        gen = gen or GenerationConfig()
        adapter = self._check_adapter(adapter or self.active)
        ids = torch.tensor([self.format.prompt_ids(messages)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(streamer=streamer, **self._generate_kwargs(gen))
        seed = gen.seed if gen.temperature > 0 else None

        failed: list[BaseException] = []

        def run() -> None:
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    self._run(ids, torch.ones_like(ids), adapter, seed, **kwargs)
            except BaseException as err:  # end the stream, or the reader would wait forever
                failed.append(err)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failed:
            raise failed[0]


def column_major_weights(model: torch.nn.Module) -> None:
    """Store every fp32 Linear weight [out, in] column-major: the same values, transposed in
    memory. On a CPU, MKL multiplies a few rows (a decoding step's) by that layout faster
    than by the row-major one (docs/PERFORMANCE.md, Evaluation); many rows, as fast."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and weight.dtype == torch.float32 \
                and weight.dim() == 2 and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()


def _is_peft(model) -> bool:
    return isinstance(model, PeftModel)
