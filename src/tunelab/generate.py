"""Batched generation shared by chat, evaluation and serving.

Prompts are rendered by `ChatFormat` (the same function training uses), left-padded into
batches sorted by length, and decoded with a KV cache until the template's end-of-turn
token. Decoding goes through the model's own `generate`, never a model-specific chat helper.

One base model stays in memory and several adapters share it, switched by name:
- `base`: the model alone (weight-delta adapters disabled);
- weight-delta adapters (LoRA and its family): all live in one PEFT model, which switches
  between them with `set_adapter` and turns them off with `disable_adapter`;
- virtual-token adapters (P-Tuning, prompt tuning): their prompt encoder does not depend on
  the input, so at inference the adapter is a fixed [n_virtual, hidden] block of input
  embeddings. It is computed once when the adapter is added and placed before each prompt,
  after the left padding, so a padded row sees exactly the positions (0..n+L-1) it would
  see alone. (PEFT's own `generate` puts it before the padding, which shifts every real
  token's position by the amount of padding: batched and one-at-a-time answers differ.)
"""

from __future__ import annotations

import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .config import GenerationConfig
from .data.template import ChatFormat

BASE = "base"
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
        self.virtual: dict[str, torch.Tensor] = {}  # name -> [n_virtual, hidden] input embeddings
        self.active = BASE
        self.model_path: Optional[str] = None  # the base's --model.path, when known
        if _is_peft(model):
            name = model.active_adapter
            self.base = model.get_base_model()
            prompt = virtual_token_embeddings(model)
            if prompt is None:
                self.lora = model
            else:
                self.virtual[name] = prompt
            self.active = name
        self.device = device or next(self.base.parameters()).device
        self.base.eval()
        self.stop_ids = self._stop_ids()

    # -- adapters ---------------------------------------------------------------------------
    @classmethod
    def from_runs(cls, runs: dict[str, Union[str, Path]], model=None,
                  device: Optional[torch.device] = None) -> "Engine":
        """One base in memory with each run's adapter under its name (`runs={"lora": dir}`).

        Args:
            runs: adapter name -> run directory; every run must be trained on the same base.
            model: the base's ModelConfig (default: the first run's). With no runs, needed.
            device: where the model lives (default: the config's device).
        """
        from transformers import AutoTokenizer

        from .config import ModelConfig, from_dict
        from .models import load_model, load_tokenizer
        from .runs import RunDir

        if model is None:
            if not runs:
                raise ValueError("Engine.from_runs needs runs or a base model config")
            first = RunDir(next(iter(runs.values())))
            model = from_dict(ModelConfig, first.read_config()["model"])
            tokenizer = AutoTokenizer.from_pretrained(first.tokenizer)
        elif runs:  # the runs' tokenizer carries the chat template they were trained with
            tokenizer = AutoTokenizer.from_pretrained(RunDir(next(iter(runs.values()))).tokenizer)
        else:
            tokenizer = load_tokenizer(model)
        engine = cls(load_model(model, device), tokenizer, device)
        engine.model_path = model.path
        for name, run in runs.items():
            engine.add_adapter(name, run)
        return engine

    @property
    def adapters(self) -> list[str]:
        """Names usable as `adapter=`: `base`, then every added adapter."""
        deltas = list(self.lora.peft_config) if self.lora is not None else []
        return [BASE] + deltas + list(self.virtual)

    def add_adapter(self, name: str, run: Union[str, Path]) -> None:
        """Load a finished run's adapter onto the base, under `name` (weights are not reloaded)."""
        from .methods import get
        from .runs import RunDir

        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is taken (names in use: {self.adapters})")
        run_dir = RunDir(Path(run))
        config = run_dir.read_config()
        if not run_dir.adapter.is_dir():
            raise FileNotFoundError(f"{run_dir.root} has no adapter/ yet: the run has not finished")
        trained_on = (config.get("model") or {}).get("path")
        if self.model_path and trained_on and trained_on != self.model_path:
            raise ValueError(f"run {run_dir.root} was trained on {trained_on!r}, but this engine's "
                             f"base is {self.model_path!r}: an adapter only fits its own base")
        method = get(config["method"]["name"])
        if method.capabilities.mergeable:
            # A weight delta: PEFT keeps several on the same injected layers.
            from peft import PeftModel

            if self.lora is None:
                self.lora = PeftModel.from_pretrained(self.base, str(run_dir.adapter), adapter_name=name)
            else:
                self.lora.load_adapter(str(run_dir.adapter), adapter_name=name)
            self.base.eval()
            return
        # Anything else must be a virtual-token prompt: load it around the same base module
        # (PEFT's prompt-learning wrapper holds a reference to the base and adds only its
        # prompt encoder, so no weight is copied), keep the prompt, drop the wrapper.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "modifying a model with PEFT a second time"
            wrapped = method.load(self.base, run_dir.adapter, False)
        prompt = virtual_token_embeddings(wrapped)
        if prompt is None:
            raise ValueError(f"method {method.name!r} is neither a weight delta (mergeable) nor a "
                             f"virtual-token prompt, so its adapter cannot share a base in the "
                             f"Engine; load it alone (`tunelab chat --run {run_dir.root}`)")
        self.virtual[name] = prompt.to(self.device)

    def use(self, name: str) -> None:
        """Make `name` the adapter used when `adapter=` is not given."""
        self._check_adapter(name)
        self.active = name

    def _check_adapter(self, name: str) -> str:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this engine has {self.adapters}")
        return name

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
        elif adapter == BASE:
            with self._deltas_off():
                out = self.base.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            self.lora.set_adapter(adapter)
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

    @torch.no_grad()
    def logits(self, ids: list[int], adapter: Optional[str] = None) -> torch.Tensor:
        """Next-token logits [len(ids), vocab] for one unpadded prompt (virtual tokens excluded)."""
        adapter = self._check_adapter(adapter or self.active)
        batch = torch.tensor([ids], device=self.device)
        mask = torch.ones_like(batch)
        if adapter in self.virtual:
            batch, mask, embeds = self._with_virtual_tokens(batch, mask, self.virtual[adapter])
            with self._deltas_off():
                out = self.base(inputs_embeds=embeds, attention_mask=mask)
        elif adapter == BASE:
            with self._deltas_off():
                out = self.base(input_ids=batch, attention_mask=mask)
        else:
            self.lora.set_adapter(adapter)
            out = self.lora(input_ids=batch, attention_mask=mask)
        return out.logits[0, -len(ids):].float()

    @torch.no_grad()
    def complete(self, prompts: list[list[int]], gen: Optional[GenerationConfig] = None,
                 batch_size: int = 16, adapter: Optional[str] = None, progress: bool = False,
                 ignore_eos: bool = False) -> list[list[int]]:
        """The new token ids for each prompt (already rendered ids), cut before the stop token.

        Sampled decoding is reproducible: batch k is seeded with `gen.seed + k`, so the same
        prompts, batch size and device give the same answers.
        """
        gen = gen or GenerationConfig()
        adapter = self._check_adapter(adapter or self.active)
        kwargs = self._generate_kwargs(gen, ignore_eos)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"generate ({adapter})", dynamic_ncols=True)
        answers: list[list[int]] = [[] for _ in prompts]
        was_training = self.base.training
        self.base.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG untouched
                for batch_index, batch in enumerate(batches):
                    ids, mask = left_pad([prompts[i] for i in batch], self.tokenizer.pad_token_id)
                    seed = gen.seed + batch_index if gen.temperature > 0 else None
                    new = self._run(ids, mask, adapter, seed, **kwargs).tolist()
                    for row, i in enumerate(batch):
                        answers[i] = new[row] if ignore_eos else self.cut_at_stop(new[row])
        finally:
            self.base.train(was_training)
        return answers

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
        worker = threading.Thread(
            target=lambda: torch.no_grad()(self._run)(ids, torch.ones_like(ids), adapter, seed, **kwargs),
            daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def virtual_token_embeddings(model) -> Optional[torch.Tensor]:
    """The [n_virtual, hidden] input embeddings a virtual-token adapter puts before every
    input (PEFT P-Tuning / prompt tuning: `get_prompt`), or None for any other model.

    The prompt encoder's input is a fixed range of virtual-token indices, so its output is
    the same for every input: computing it once is exact (in eval mode: no dropout).
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)
    model.train(was_training)
    hidden = model.get_base_model().get_input_embeddings().weight.shape[1]
    if not torch.is_tensor(prompt) or prompt.dim() != 3 or prompt.shape[-1] != hidden:
        raise ValueError(f"{config.peft_type} adapters inject keys and values into every layer "
                         f"(a prefix), not input embeddings: they cannot be used as virtual tokens")
    return prompt[0].detach()


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
