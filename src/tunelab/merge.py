"""Merge / export: a finished run becomes a plain Hugging Face model directory.

- Weight-delta methods (`capabilities.mergeable`, the LoRA family): the adapter is folded
  into the base weights.
- Virtual-token methods (P-Tuning, `--bake`): nothing can be folded into weights, so the
  learned prompt becomes n new tokens of the vocabulary whose embedding rows are the prompt
  encoder's output, and the exported chat template writes them first in every input, where
  PEFT puts them. The new tokens are never generated: their ids are in the generation
  config's `suppress_tokens`, and their output-head rows are zero (logit 0) for runtimes that
  ignore it; a tied head is untied for that (vocab x hidden more weights).

The directory (safetensors, config, tokenizer with its chat template, generation_config
whose `eos_token_id` list starts with the template's end of turn) loads with transformers,
vLLM or llama.cpp's converter and no tunelab code. Before it is written as final it is
checked: logits on probe prompts must match the adapter on its base (computed in fp32 by
default: max |difference| <= 1e-4 x the largest |logit|), every weight must be finite, and
the saved directory is reloaded with plain transformers, rendered through its own chat
template, and must reproduce the checked model's logits. It is written under a temporary
name and renamed, so a crash leaves either the old directory or the new one.
tunelab_export.json beside the weights records what was measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from .config import ConfigError, ModelConfig
from .data.template import ChatFormat
from .methods import get
from .methods.registry import NotMergeable as MethodNotMergeable
from .methods.virtual_tokens import virtual_token_embeddings
from .models import load_model, locate, resolve_device
from .runs import (EXPORT_MARKER, RunDir, check_adapter, check_base, check_export_target, run_model_config,
                   write_atomically, write_json)

EXPORT_INFO = EXPORT_MARKER
"""Written beside the weights: where they came from and what the checks measured. It also
marks the directory as a tunelab export, the only kind `--out` replaces without asking."""

PROBES = ["Who are you?", "你是谁？", "1.11 和 1.9 哪个大？",
          "Write two sentences about the sea, then list three fish."]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.01}
"""Max |logit difference| allowed, per dtype the check is computed in, as a fraction of the
largest |logit| (when that is above 1): absolute rounding error grows with the logits'
scale. fp32 differs only in summation order (SmolLM2-135M LoRA: 1.1e-4 on logits up to 40,
2.7e-6 of the scale). bf16 keeps 8 bits of mantissa: the merged W + BA is rounded once where
W x + B(A x) rounds twice, in every layer, so only gross errors are caught there; that is
why the default is to merge and check in fp32 and cast afterwards."""


class NotMergeable(MethodNotMergeable, ConfigError):
    """The run's method cannot be folded into weights; the message says what to do instead
    (a ConfigError too, so the CLI prints it as a usage error)."""


class ExportMismatch(RuntimeError):
    """The exported model does not compute what the adapter on its base computes."""


def merge(run: str, out: Optional[str] = None, bake: bool = False,
          dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
          precision: Literal["fp32", "run"] = "fp32", device: str = "auto",
          max_shard_size: str = "5GB", overwrite: bool = False,
          model: Optional[ModelConfig] = None) -> Path:
    """Export a run as a plain Hugging Face model directory (no adapter, no tunelab needed).

    Args:
        run: a finished run directory.
        out: the model directory to write (default: RUN/merged, or RUN/baked with --bake). An
            existing one is replaced only if it is an earlier tunelab export (it holds
            tunelab_export.json); any other existing directory needs --overwrite true, and
            the run itself and its base model are never written over.
        bake: for virtual-token methods (P-Tuning): write the learned prompt as new tokens of
            the vocabulary that the exported chat template puts first in every input.
        dtype: dtype of the written weights; `auto` keeps the base checkpoint's.
        precision: dtype the merge and its check are computed in: `fp32` (max |logit
            difference| 1e-4) or `run` (the run's own dtype, e.g. bf16 on a GPU: half the
            memory, a looser check).
        device: where the merge is computed (`auto`: the first CUDA card, else CPU).
        max_shard_size: largest safetensors shard.
        overwrite: replace an existing `out` that is not a tunelab export (its files are lost).
        model: the base model, where it is not at the path the run's config.yaml records (it
            was moved): `--model.path NEW_DIR`. It must be the same model (checked).
    """
    run_dir = RunDir(Path(run))
    out = out or str(run_dir.root / ("baked" if bake else "merged"))
    model_cfg = run_model_config(run_dir, run_dir.read_config(), model)
    check_export_target(Path(out), overwrite, run_dir.root, locate(model_cfg)[0])  # before any work
    loaded = load_merged(run, bake, precision, device, model)
    model, tokenizer, expected, info = loaded.model, loaded.tokenizer, loaded.expected, loaded.info
    conversations, feed = loaded.conversations, loaded.feed
    out_dtype = DTYPES[dtype] if dtype != "auto" else _checkpoint_dtype(*locate(loaded.model_cfg))
    info["dtype"] = str(out_dtype).removeprefix("torch.")
    # The merge was checked in `precision`; the cast to the written dtype is the user's choice,
    # its cost is reported, and the saved files must reproduce the cast model exactly.
    cast_weights(model, out_dtype)
    written = [_logits(model, ids)[-e.shape[0]:] for ids, e in zip(feed, expected)]
    if not all(torch.isfinite(w).all() for w in written):
        raise ExportMismatch(f"the model cast to {out_dtype} computes non-finite logits; "
                             f"choose another --dtype")
    info["cast_max_abs_diff"] = max_diff(written, expected)
    export_generation_config(model, tokenizer, info.get("virtual_token_ids", []))

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        info["reloaded_max_abs_diff"] = check_reloaded(tmp, conversations, feed, written, out_dtype)
        write_json(tmp / EXPORT_INFO, info)
        _usual_permissions(tmp)

    path = write_atomically(Path(out), fill)
    print(f"wrote {path} ({info['kind']}): max |logit difference| from the adapter on its base "
          f"{info['max_abs_diff']:.2e} ({precision}), {info['cast_max_abs_diff']:.2e} once cast to "
          f"{info['dtype']}; reloaded from disk: {info['reloaded_max_abs_diff']:.2e} from the model written")
    return path


@dataclass
class Merged:
    """A run's adapter folded into (or baked onto) its base, checked against the adapter."""
    run_dir: RunDir
    config: dict
    model_cfg: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    conversations: list[list[dict]]
    """The probe conversations (under the run's system prompt)."""
    probes: list[list[int]]
    """Their prompt ids as the run's template renders them (without baked virtual tokens)."""
    expected: list[torch.Tensor]
    """The adapter on its base: logits on the probes (at the real tokens)."""
    info: dict

    @property
    def feed(self) -> list[list[int]]:
        """What the exported model is fed: the baked tokens, if any, then the prompt."""
        return [self.info.get("virtual_token_ids", []) + ids for ids in self.probes]


def load_merged(run: str, bake: Optional[bool], precision: Literal["fp32", "run"] = "fp32",
                device: str = "auto", model: Optional[ModelConfig] = None) -> Merged:
    """Load a finished run, fold its adapter in (`bake`: write its virtual tokens into the
    vocabulary; None: whichever the method allows) and check the result against the adapter
    on its base (ExportMismatch otherwise). `model`: the base, where it was moved."""
    from transformers import AutoTokenizer

    run_dir = RunDir(Path(run))
    config = run_dir.read_config()
    if not run_dir.adapter.is_dir():
        raise FileNotFoundError(f"{run_dir.root} has no adapter/ yet: the run has not finished "
                                f"(resume it with `tunelab train --config {run_dir.config}`)")
    method = get(config["method"]["name"])
    virtual = method.capabilities.adapter_kind == "input_embeddings"  # bakeable into a vocabulary
    if bake is None:
        bake = not method.capabilities.mergeable and virtual
    if method.capabilities.mergeable and bake:
        raise ConfigError(f"`--bake true` exports virtual-token adapters; {method.name} adapters fold "
                          f"into the weights: run `tunelab merge` without `--bake true`")
    if not method.capabilities.mergeable and not bake:
        instead = (f" To export it anyway: `tunelab merge {run} --out DIR --bake true` writes its virtual "
                   f"tokens as new tokens of the vocabulary, put first by the chat template." if virtual else "")
        raise NotMergeable(f"{method.name} adapters cannot be merged into the base weights: "
                           f"{_refusal(method)}.{instead}")
    if bake and not virtual:
        raise NotMergeable(f"`--bake` needs virtual tokens that are input embeddings (P-Tuning, prompt "
                           f"tuning); the {method.name} adapter of {run} is not one (prefix tuning puts "
                           f"keys and values in every layer, which no vocabulary token can hold)")

    model_cfg = run_model_config(run_dir, config, model)
    where = resolve_device(device)
    model_cfg = replace(model_cfg, device=str(where), dtype="fp32" if precision == "fp32" else model_cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(run_dir.tokenizer)
    fmt = ChatFormat(tokenizer)
    system = (config.get("data") or {}).get("system_prompt")
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                     for q in PROBES]
    probes = [fmt.prompt_ids(messages) for messages in conversations]

    check_base(run_dir, model_cfg)  # before any weight is read
    base = load_model(model_cfg, where)
    check_adapter(run_dir.adapter, base)
    net = method.load(base, run_dir.adapter, False).eval()
    if bake:
        model, tokenizer, expected, info = bake_virtual_tokens(net, tokenizer, probes)
    else:
        model, expected, info = merge_weights(net, method, probes)
    check_finite(model)
    info.update(run=str(run_dir.root.resolve()), method=method.name, base=config["model"]["path"])
    return Merged(run_dir, config, model_cfg, model, tokenizer, conversations, probes, expected, info)


# -- weight deltas ------------------------------------------------------------------------------
def merge_weights(net, method, probes: list[list[int]]):
    """(merged model, the adapter's logits on the probes, info): fold the adapter in, check it."""
    expected = [_logits(net, ids) for ids in probes]
    model = method.merge(net)  # the method's hook (PEFT's merge_and_unload for LoRA and IA3)
    diff = max_diff([_logits(model, ids) for ids in probes], expected)
    dtype = next(model.parameters()).dtype
    _require(diff, expected, dtype, "the merged model")
    return model, expected, {"kind": "merged", "max_abs_diff": diff, "tolerance": tolerance(dtype, expected)}


# -- virtual tokens -----------------------------------------------------------------------------
def bake_virtual_tokens(net, tokenizer, probes: list[list[int]]):
    """(model, tokenizer, the adapter's logits on the probes, info) with the virtual tokens
    baked into the vocabulary.

    PEFT feeds [virtual tokens] + input_ids with default positions 0..n+L-1; the exported
    template writes the new tokens before everything else it writes, so the baked model
    sees the same embeddings at the same positions and computes the same logits.
    """
    from transformers import AddedToken

    prompt = virtual_token_embeddings(net)
    if prompt is None:
        raise NotMergeable("this adapter's virtual tokens are keys and values in every layer (a "
                           "prefix), not input embeddings: they cannot become vocabulary tokens")
    n = prompt.shape[0]
    expected = [_logits(net, ids)[n:] for ids in probes]
    model = net.get_base_model()

    names = _fresh_names(tokenizer, n)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names], special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    embeddings = model.get_input_embeddings()
    if max(new_ids) >= embeddings.weight.shape[0]:  # else the vocab already had spare rows
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head.weight is embeddings.weight
    if tied:
        # A tied head row is the virtual embedding itself, whose logit dwarfs every real token's
        # (SmolLM2-135M P-Tuning: by about 700): a runtime that ignores `suppress_tokens`
        # (vLLM, llama.cpp) would emit it at every step. An untied copy of the head with zero
        # rows for the new tokens costs vocab x hidden weights and makes their logit 0.
        head = torch.nn.Linear(embeddings.weight.shape[1], embeddings.weight.shape[0], bias=False,
                               device=embeddings.weight.device, dtype=embeddings.weight.dtype)
        head.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
        model.set_output_embeddings(head)
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        scale = getattr(embeddings, "embed_scale", 1.0)  # Gemma-style scaled embedding modules
        embeddings.weight[new_ids] = (prompt / scale).to(embeddings.weight.dtype)
        head.weight[new_ids] = 0  # logit 0, far below a real answer's; suppress_tokens: never
        if getattr(head, "bias", None) is not None:
            head.bias[new_ids] = 0
    tokenizer.chat_template = _prefixed(tokenizer.chat_template, "".join(names))

    encoded = ChatFormat(tokenizer).encode("".join(names))
    if encoded != new_ids:
        raise ExportMismatch(f"the new tokens {names} do not tokenize as themselves: {encoded}")
    baked = [new_ids + ids for ids in probes]
    got = [_logits(model, ids)[n:] for ids in baked]
    diff = max_diff(got, expected)
    dtype = next(model.parameters()).dtype
    _require(diff, expected, dtype, "the baked model")
    info = {"kind": "baked virtual tokens", "max_abs_diff": diff, "tolerance": tolerance(dtype, expected),
            "virtual_tokens": names, "virtual_token_ids": new_ids, "untied_head": tied,
            # > 0: even where suppress_tokens is ignored, greedy decoding never picks a new token
            "min_top_logit": min(g[:, :e.shape[1]].max(-1).values.min().item() for g, e in zip(got, expected))}
    return model, tokenizer, expected, info


def _fresh_names(tokenizer, n: int) -> list[str]:
    vocab = tokenizer.get_vocab()
    stem = "<|virtual_{}|>"
    suffix = 0
    while any(stem.format(i) in vocab for i in range(n)):
        suffix += 1
        stem = "<|virtual" + str(suffix) + "_{}|>"
    return [stem.format(i) for i in range(n)]


def _prefixed(template, text: str):
    """The chat template with `text` written before anything else (also named templates)."""
    if isinstance(template, dict):
        return {name: _prefixed(t, text) for name, t in template.items()}
    return "{{ '" + text + "' }}" + template


# -- checks -----------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def max_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Max |logit difference| over the expected vocabulary (baked tokens are extra columns)."""
    return max((g[:, :e.shape[1]] - e).abs().max().item() for g, e in zip(got, expected))


def tolerance(dtype: torch.dtype, expected: list[torch.Tensor]) -> float:
    scale = max(1.0, max(e.abs().max().item() for e in expected))
    return TOLERANCE[dtype] * scale


def _require(diff: float, expected: list[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    limit = tolerance(dtype, expected)
    if not diff <= limit:  # also catches NaN
        raise ExportMismatch(f"{what} differs from the adapter on its base: max |logit difference| "
                             f"{diff:.3g} > {limit:.3g} ({dtype}); nothing was written")


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights only, as `from_pretrained(dtype=...)` loads them: buffers such as the
    rotary inverse frequencies stay fp32 (`model.to(bf16)` would round them too)."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    model.config.dtype = dtype


def check_finite(model: torch.nn.Module) -> None:
    """Every weight and buffer, not just the trainable ones."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"refusing to export: {name} has NaN/Inf values")


def check_reloaded(directory: Path, conversations: list[list[dict]], feed: list[list[int]],
                   written: list[torch.Tensor], dtype: torch.dtype) -> float:
    """Load `directory` with plain transformers, as a user would: its chat template must
    render the ids that were checked, and its logits must be those of the model written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    diffs = []
    for messages, ids, want in zip(conversations, feed, written):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rendered = tokenizer(text, add_special_tokens=False)["input_ids"]
        if rendered != ids:
            raise ExportMismatch(f"the saved chat template renders {rendered[:12]}... where the "
                                 f"checked model was fed {ids[:12]}...; nothing was written")
        diffs.append((_logits(model, ids)[-want.shape[0]:] - want).abs().max().item())
    diff = max(diffs)
    _require(diff, written, dtype, f"the saved model (reloaded from {directory})")
    del model
    return diff


# -- files --------------------------------------------------------------------------------------
def export_generation_config(model, tokenizer, suppress: list[int]) -> None:
    """Stop at the template's end of turn in every runtime; never emit the baked tokens."""
    fmt = ChatFormat(tokenizer)
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [fmt.end_of_turn_id] + [i for i in eos + [tokenizer.eos_token_id]
                                    if i is not None and i != fmt.end_of_turn_id]
    gen.eos_token_id = list(dict.fromkeys(stops))
    gen.pad_token_id = tokenizer.pad_token_id
    if suppress:
        gen.suppress_tokens = list(suppress)
    model.config.eos_token_id = fmt.end_of_turn_id
    if fmt.end_of_turn_text and tokenizer.eos_token != fmt.end_of_turn_text:
        # Runtimes that stop at the tokenizer's eos (llama.cpp's converter reads it) stop there.
        tokenizer.eos_token = fmt.end_of_turn_text


def _usual_permissions(directory: Path) -> None:
    """transformers 5.2x writes safetensors shards readable by their owner only (0600); a
    model directory is read by servers running as other users, so apply the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _checkpoint_dtype(directory: Path, gguf) -> torch.dtype:
    """The dtype the base checkpoint declares (fp32 when it declares none, e.g. GGUF)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # an unreadable config only costs the default
        return torch.float32
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in TOLERANCE else torch.float32


def _refusal(method) -> str:
    """The method's own reason for refusing a merge (its hook raises without reading the model)."""
    try:
        method.merge(None)
    except MethodNotMergeable as err:
        return str(err).rstrip(".")
    except Exception:
        pass
    return "it changes no weight of the base model, so there is nothing to fold into it"
