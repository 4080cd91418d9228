"""What the virtual-token methods (P-Tuning, prompt tuning, prefix tuning) share.

They are PEFT prompt-learning adapters: trained vectors placed before every input, either
as input embeddings (P-Tuning, prompt tuning) or as keys and values in every layer
(prefix tuning). PEFT's wrapper leaves three gaps, closed here once for all three:

- Generation. PEFT injects the virtual tokens from its `prepare_inputs_for_generation`,
  which recognises the first step by `past_key_values` / `cache_position`. transformers
  5.2x passes the cache as `cache` and no `cache_position`, so PEFT re-inserts the P-Tuning
  prompt at every decoding step and never inserts the prefix: generation silently
  disagrees with the trained model. `VirtualTokenModel.generate` inserts them inside the
  base model's forward at the first step of each generation (whatever the cache is called)
  and gives every real token the position it has without padding, so a left-padded row
  decodes as it would alone.
- Helpers that bypass the adapter. `PeftModel` forwards unknown attributes to the base
  model, so `model.chat(...)` of a remote-code model runs the base without the virtual
  tokens. `VirtualTokenModel` refuses model-specific callables and says what to use.
- Continuing training. PEFT saves only the encoder's output (the final virtual-token
  embeddings), so a P-Tuning adapter reloaded for training gets a fresh random encoder
  fed with those embeddings. `save` also writes the encoder itself
  (`prompt_encoder.safetensors`) and `load(..., trainable=True)` restores it.

The wrapper keeps PEFT's forward: logits cover the virtual positions too (P-Tuning and
prompt tuning return `num_virtual_tokens` extra positions first; prefix tuning none).
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, PeftModelForCausalLM, PeftType
from safetensors.torch import load_file, save_file

ENCODER_FILE = "prompt_encoder.safetensors"
"""The whole prompt encoder (embedding + MLP/LSTM head), next to PEFT's adapter files."""

# Generation patches the base model's forward for its duration; one generation at a time.
_GENERATING = threading.RLock()


class AdapterBypass(AttributeError):
    """A model-specific helper was reached through a virtual-token adapter, which it would skip."""


class VirtualTokenModel(PeftModelForCausalLM):
    """PEFT's causal-LM wrapper for a virtual-token adapter: generation that injects the
    tokens on any transformers 5.x, and no path to the base model's own helpers."""

    def generate(self, *args, **kwargs):
        base = self.get_base_model()
        if getattr(self, "_adapters_disabled", False) or "forward" in self.__dict__:
            return base.generate(*args, **kwargs)  # inside `with model.disable_adapter():`
        with _GENERATING, _injecting(self, base):
            return base.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":
                raise
        value = getattr(self.base_model, name)
        if callable(value) and not isinstance(value, torch.nn.Module) and not _generic(name):
            base = type(self.base_model).__name__
            raise AdapterBypass(
                f"`{name}` is a helper of {base}, not of the {self.active_peft_config.peft_type.value} "
                f"model: reached through the PEFT wrapper it would run the base model without the "
                f"virtual tokens. Generate with `model.generate(...)` (tunelab's Engine: `tunelab chat`, "
                f"evaluation, serving), or call `model.get_base_model().{name}(...)` if you really "
                f"want the base model alone")
        return value


@functools.cache
def _generic_names() -> frozenset[str]:
    from transformers import GenerationMixin, PreTrainedModel

    return frozenset(dir(PreTrainedModel)) | frozenset(dir(GenerationMixin))


def _generic(name: str) -> bool:
    """Attributes every transformers model has: safe, they do not compute outputs their own way."""
    return name in _generic_names()


def promote(model: torch.nn.Module) -> VirtualTokenModel:
    """Give a PEFT causal-LM prompt-learning model tunelab's generation and guard (in place)."""
    if not isinstance(model, PeftModelForCausalLM) or not model.active_peft_config.is_prompt_learning:
        raise TypeError(f"expected a PEFT causal-LM prompt-learning model, got {type(model).__name__}")
    model.__class__ = VirtualTokenModel
    return model


def is_prefix(model: PeftModel) -> bool:
    """Prefix tuning puts its virtual tokens in the KV cache instead of the input embeddings."""
    return model.active_peft_config.peft_type == PeftType.PREFIX_TUNING


def trainable_prompt(model: torch.nn.Module):
    """A function returning the [n_virtual, hidden] input embeddings that a P-Tuning or
    prompt-tuning adapter puts before every row, with gradients to its encoder; None for
    prefix tuning and anything that is not such an adapter.

    It computes what PEFT's `get_prompt` computes in training (the encoder over the
    virtual-token indices, dropout included) but keeps the indices on the device: PEFT copies
    them from the host on every forward, which a CUDA graph cannot capture.
    """
    if not isinstance(model, PeftModel) or not model.active_peft_config.is_prompt_learning:
        return None
    if model.active_peft_config.peft_type not in (PeftType.P_TUNING, PeftType.PROMPT_TUNING):
        return None
    encoder = model.prompt_encoder[model.active_adapter]
    tokens = model.prompt_tokens[model.active_adapter][None].to(encoder.embedding.weight.device)

    def prompt() -> torch.Tensor:
        return encoder(tokens)[0]
    return prompt


# -- generation --------------------------------------------------------------------------

@contextmanager
def _injecting(model: PeftModel, base: torch.nn.Module):
    """Route the base model's forward through `_with_virtual_tokens` while generating."""
    original = base.forward
    own = base.__dict__.get("forward")  # an instance-level forward (e.g. accelerate hooks)

    @functools.wraps(original)  # generate() inspects the forward's signature
    def forward(*args, **kwargs):
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        return original(*args, **_with_virtual_tokens(model, kwargs))

    base.forward = forward
    try:
        yield
    finally:
        if own is None:
            del base.forward
        else:
            base.forward = own


def _with_virtual_tokens(model: PeftModel, kwargs: dict) -> dict:
    """One forward of generate(): add the virtual tokens at the first step of a cache, extend
    the attention mask over them and set positions as if the row had no padding."""
    n_virtual = model.active_peft_config.num_virtual_tokens
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    batch = (ids if ids is not None else embeds).shape[0]
    cache_key = "cache" if "cache" in kwargs else "past_key_values"  # transformers >= 5.2x / older
    cache = kwargs.get(cache_key)
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:  # first step of this generation (or every step when decoding without a cache)
        if is_prefix(model):
            prefix = model.get_prompt(batch_size=batch)  # a cache holding every layer's keys/values
            if cache is None:
                kwargs[cache_key] = prefix
            else:
                for layer, (keys, values) in enumerate(_layers(prefix)):
                    cache.update(keys, values, layer)
            past = n_virtual
        else:
            embeds = model.word_embeddings(ids) if embeds is None else embeds
            prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
            embeds, ids = torch.cat([prompts, embeds], dim=1), None
    new = (ids if ids is not None else embeds).shape[1]
    device = (ids if ids is not None else embeds).device
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("virtual-token generation needs a 2-D attention mask (no static cache)")
        mask = torch.cat([mask.new_ones(batch, n_virtual), mask], dim=1)
        kwargs["attention_mask"] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
    else:
        positions = torch.arange(past, past + new, device=device).expand(batch, new)
    kwargs["position_ids"] = positions
    if kwargs.get("cache_position") is not None:  # transformers < 5.2x
        kwargs["cache_position"] = torch.arange(past, past + new, device=device)
    kwargs["input_ids"], kwargs["inputs_embeds"] = ids, embeds
    return kwargs


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


# -- save / load -------------------------------------------------------------------------

def apply(model: torch.nn.Module, peft_config) -> VirtualTokenModel:
    from peft import get_peft_model

    return promote(get_peft_model(model, peft_config))


def save(model: PeftModel, directory: Path) -> None:
    """PEFT's adapter files (the final virtual tokens, for inference) + the whole encoder."""
    directory = Path(directory)
    was_training = model.training
    model.eval()  # the saved virtual tokens are the encoder's output without dropout
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        model.train(was_training)
    if not model.active_peft_config.inference_mode:  # an encoder loaded for inference is only its output
        encoder = model.prompt_encoder[model.active_adapter]
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                  str(directory / ENCODER_FILE))


def load(base: torch.nn.Module, directory: Path, trainable: bool = False) -> VirtualTokenModel:
    """The saved adapter on `base`. With trainable=True the encoder is restored as it was
    trained (PEFT itself refuses to load a prompt-learning adapter for training)."""
    directory = Path(directory)
    if not trainable:
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
        model.requires_grad_(False)
        return promote(model)
    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_pretrained(str(directory))
    config.inference_mode = False
    model = get_peft_model(base, config)
    encoder = model.prompt_encoder[model.active_adapter]
    if (directory / ENCODER_FILE).is_file():
        encoder.load_state_dict(load_file(str(directory / ENCODER_FILE)), strict=True)
    elif set(encoder.state_dict()) == {"embedding.weight"}:  # the saved embeddings are the whole adapter
        encoder.load_state_dict({"embedding.weight": load_file(str(directory / "adapter_model.safetensors"))
                                 ["prompt_embeddings"]}, strict=True)
    else:
        raise ValueError(
            f"{directory} holds only the final virtual-token embeddings (PEFT's own save), not the "
            f"{config.peft_type.value} prompt encoder that produced them, so training cannot continue "
            f"from it. It works for inference (chat, eval); to train further, start a new run "
            f"(tunelab's saves include {ENCODER_FILE})")
    return promote(model)


def virtual_token_embeddings(model) -> torch.Tensor | None:
    """The [n_virtual, hidden] input embeddings a P-Tuning / prompt-tuning adapter puts before
    every input; None for prefix tuning, whose virtual tokens are keys and values.

    The prompt encoder reads a fixed range of virtual-token indices, so its output is the
    same for every input: computing it once (in eval mode: no dropout) is exact.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)
    model.train(was_training)
    hidden = model.get_base_model().get_input_embeddings().weight.shape[1]
    if not torch.is_tensor(prompt) or prompt.dim() != 3 or prompt.shape[-1] != hidden:
        return None
    return prompt[0].detach()
