"""Batched generation shared by chat, evaluation and serving.

Prompts are rendered by `ChatFormat` (the same function training uses), left-padded into
batches sorted by length, and decoded with a KV cache until the template's end-of-turn
token. Generation goes through the model's own `generate` (for PEFT models the wrapper's,
which is the path that injects virtual tokens), never a model-specific chat helper.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch

from .config import GenerationConfig
from .data.template import ChatFormat


class Engine:
    """Answers conversations with one model; several adapters can share its base."""

    def __init__(self, model, tokenizer, device: torch.device | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.device = device or next(model.parameters()).device
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        # The template's end of turn first; eos too when it differs, since some checkpoints
        # were trained to emit it (never eos alone: GGUF tokenizers disagree on what it is).
        ids = [self.format.end_of_turn_id]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def _generate_kwargs(self, gen: GenerationConfig) -> dict:
        sample = gen.temperature > 0
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=sample,
                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=gen.repetition_penalty)
        if sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
        else:  # silence the model's generation_config sampling defaults under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], gen: GenerationConfig | None = None,
                 batch_size: int = 16, progress: bool = False) -> list[str]:
        """One answer per conversation (each a list of role/content messages)."""
        gen = gen or GenerationConfig()
        prompts = [self.format.prompt_ids(messages) for messages in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        kwargs = self._generate_kwargs(gen)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="generate", dynamic_ncols=True)
        was_training = self.model.training
        self.model.eval()
        for batch_index, batch in enumerate(batches):
            torch.manual_seed(gen.seed + batch_index)
            ids, mask = left_pad([prompts[i] for i in batch], self.tokenizer.pad_token_id)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      **kwargs)
            for row, i in enumerate(batch):
                answers[i] = self.decode(out[row, ids.shape[1]:].tolist())
        self.model.train(was_training)
        return answers

    def decode(self, ids: list[int]) -> str:
        for n, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:n]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def stream(self, messages: list[dict], gen: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        gen = gen or GenerationConfig()
        torch.manual_seed(gen.seed)
        ids = torch.tensor([self.format.prompt_ids(messages)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      **self._generate_kwargs(gen))
        worker = threading.Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs), daemon=True)
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
