"""Export a run to one GGUF file (llama.cpp, LM Studio) or an Ollama model, checked by reloading it.

The run is merged first (merge.load_merged: LoRA-family adapters folded into the weights,
P-Tuning baked into new vocabulary tokens that the template writes first), then written
with the `gguf` package: llama.cpp's tensor names, its Q/K row order for Llama, the
byte-level BPE vocabulary with merges, token types and special ids, and the run's chat
template, so a runtime renders prompts as training did. `add_bos_token` is false: training
tokenized the rendered template without adding special tokens, so a runtime adding a BOS
the template does not write would feed ids the model never saw (the "doubled BOS").

Before the file gets its final name it is read back by an independent reader
(transformers' GGUF loader, model and tokenizer) and compared with the merged model in
memory on probe prompts: the rendered prompt ids must be identical, the logits within the
format's tolerance, the greedy answers the same (f16, bf16) and the loss on held-out rows
within 1%. llama.cpp (llama-cpp-python) is a second reader when it is importable. A
mismatch raises ExportMismatch and leaves no file; the figures go to a JSON beside it.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from .config import ConfigError, DataConfig, from_dict
from .data import prepare
from .data.template import IGNORE, ChatFormat
from .merge import EXPORT_INFO, ExportMismatch, _logits, load_merged
from .ollama import ollama_modelfile, ollama_name
from .runs import write_atomically, write_json

QUANTS = ("f16", "bf16", "q8_0")

LOGIT_TOLERANCE = {"f16": 0.01, "bf16": 0.1, "q8_0": 0.2}
"""What rounding the weights to the file's format may cost: max |logit difference| between the
reloaded file and the merged model in memory (both computed in fp32), as a fraction of the
largest |logit| (when that is above 1). The weights are rounded to 10 mantissa bits (f16), 7
(bf16) or 8-bit blocks with one scale per 32 values (q8_0). The bounds are loose enough for the
tests' tiny random models (hidden 32, weights of std 0.3: up to 0.3%, 4% and 14%); real models
stay far below (SmolLM2-135M: docs/EXPORT.md). Misplaced weights are caught by EXACT_TOLERANCE."""

EXACT_TOLERANCE = 1e-4
"""Max |logit difference| between the reloaded file and the merged model with its weights rounded
to the file's format in memory, as a fraction of the largest |logit|: they differ only in
summation order (as merge.py's fp32 check), so any misplaced or altered weight shows."""

LOSS_TOLERANCE = 0.01
"""q8_0: held-out loss of the reloaded file within 1% (relative) of the merged model's
(reported for f16 and bf16 too, whose check is the same greedy answers)."""

MAX_NEW_TOKENS = 16
HELD_OUT_ROWS = 32
GENERAL_PROBES = Path(__file__).parent / "assets" / "probes" / "general.yaml"

ARCHITECTURES = {"qwen2": "QWEN2", "llama": "LLAMA"}
"""HF `model_type` -> gguf.MODEL_ARCH member."""

FILE_TYPES = {"f16": 1, "q8_0": 7, "bf16": 32}
"""llama.cpp's LLAMA_FTYPE_MOSTLY_* of each format."""

PRE_TOKENIZERS = {"qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                  "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}
"""llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) for the split regexes they stand for."""


def export(run: str, format: Literal["gguf", "ollama"] = "gguf", quant: Literal["f16", "bf16", "q8_0"] = "q8_0",
           out: Optional[str] = None, name: Optional[str] = None, overwrite: bool = False,
           device: str = "auto") -> Path:
    """Export a run as a GGUF file (llama.cpp, LM Studio) or an Ollama model, checked by reloading it.

    Args:
        run: a finished run directory (a LoRA-family run is merged, a P-Tuning run baked first).
        format: `gguf`: one .gguf file; `ollama`: a directory with the .gguf and a Modelfile.
        quant: weight format: `f16`, `bf16` or `q8_0` (8 bits, about half of f16's size).
        out: the file (gguf) or directory (ollama) to write (default: RUN/model-QUANT.gguf or
            RUN/ollama). An existing one is replaced only if tunelab exported it.
        name: the Ollama model name in the printed `ollama create` command (default: the run's
            directory name).
        overwrite: replace an existing `--out` that is not a tunelab export.
        device: where the merge and the checks are computed (`auto`: the first CUDA card, else CPU).
    """
    if format not in ("gguf", "ollama"):
        raise ConfigError(f"`--format` must be gguf or ollama, got {format!r}")
    if quant not in QUANTS:
        raise ConfigError(f"`--quant` must be one of {', '.join(QUANTS)}, got {quant!r}")
    root = Path(run)
    target = Path(out) if out else root / ("ollama" if format == "ollama" else f"model-{quant}.gguf")
    _check_target(target, root, format, overwrite)

    merged = load_merged(run, None, "fp32", device)
    model, tokenizer = merged.model, merged.tokenizer
    architecture(model)  # refuse an unsupported model before anything is written
    fmt = ChatFormat(tokenizer)
    system = (merged.config.get("data") or {}).get("system_prompt")
    modelfile = ollama_modelfile(tokenizer, fmt, system, f"model-{quant}.gguf") if format == "ollama" else None
    held_out = held_out_rows(merged.config, fmt, merged.info.get("virtual_token_ids", []))
    info = dict(merged.info, format=format, quant=quant)
    if format == "ollama":
        info["ollama_create"] = (f"ollama create {ollama_name(name or root.resolve().name)} "
                                 f"-f {target.resolve() / 'Modelfile'}")

    def write_and_check(path: Path) -> dict:
        start = time.perf_counter()
        write_gguf(model, tokenizer, path, quant, name=merged.run_dir.root.name)
        written = time.perf_counter()
        parity = check_gguf(path, model, fmt, merged.conversations, merged.feed, held_out, quant,
                            len(merged.info.get("virtual_token_ids", [])))
        parity["seconds"] = {"write": round(written - start, 2), "check": round(time.perf_counter() - written, 2)}
        return parity

    if format == "gguf":
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.gguf")  # the reader wants .gguf
        try:
            info["parity"] = write_and_check(tmp)
            write_json(sidecar(target), info)
            os.replace(tmp, target)  # the file gets its name only once it passed
        finally:
            tmp.unlink(missing_ok=True)
        path, gguf_path = target, target
    else:
        def fill(directory: Path) -> None:
            info["parity"] = write_and_check(directory / f"model-{quant}.gguf")
            (directory / "Modelfile").write_text(modelfile, encoding="utf-8")
            write_json(directory / EXPORT_INFO, info)

        path = write_atomically(target, fill)
        gguf_path = path / f"model-{quant}.gguf"
    print(json.dumps(info["parity"], indent=2))
    print(f"wrote {gguf_path} ({quant}, {info['kind']}): {summary_line(info['parity'])}")
    if format == "ollama":
        print(info["ollama_create"])
    return path


def sidecar(gguf_file: Path) -> Path:
    """The JSON beside an exported .gguf file: what it came from and what the check measured."""
    return gguf_file.with_name(gguf_file.stem + ".tunelab_export.json")


def _check_target(target: Path, run: Path, format: str, overwrite: bool) -> None:
    if target.exists():
        ours = sidecar(target).is_file() if format == "gguf" else (target / EXPORT_INFO).is_file()
        if target.resolve() == run.resolve() or run.resolve().is_relative_to(target.resolve()):
            raise ConfigError(f"`--out {target}` would replace the run itself; choose another path")
        if format == "gguf" and target.is_dir():
            raise ConfigError(f"`--out {target}` is a directory; `--format gguf` writes one file (e.g. {target}/model.gguf)")
        if not ours and not overwrite:
            raise ConfigError(f"`--out {target}` exists and is not a tunelab export; choose another path "
                              f"or pass `--overwrite true` to replace it")


def summary_line(parity: dict) -> str:
    held = parity["loss"]
    return (f"reloaded by transformers: prompt ids identical, max |logit difference| {parity['max_abs_diff']:.3g} "
            f"(<= {parity['tolerance']:.3g}), greedy answers {parity['greedy_same']}/{parity['probes']} the same, "
            f"loss on {held['on']} {held['exported']:.4f} vs {held['merged']:.4f} ({held['relative_diff']:+.2%})")


# -- writing -----------------------------------------------------------------------------------
def architecture(model) -> str:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export supports the {' and '.join(ARCHITECTURES)} families; this run's "
                          f"model is {model_type!r}. `tunelab merge` writes a Hugging Face directory "
                          f"that llama.cpp's convert_hf_to_gguf.py may take")
    scaling = getattr(model.config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(f"GGUF export does not write {rope_type!r} rope scaling yet (model {model_type})")
    return model_type


def gguf_tensors(model, model_type: str):
    """(llama.cpp name, fp32 array) for every weight, in llama.cpp's layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type]), config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    for hf_name, param in model.named_parameters():  # a tied head is one parameter: written once
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"no GGUF name for the {model_type} weight {hf_name}")
        data = param.detach().float().cpu()
        if model_type == "llama":
            # llama.cpp rotates adjacent pairs where transformers rotates the two halves of a head
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_rotary(data, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_rotary(data, n_kv)
        yield name, data.numpy()


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from halves order (HF) to interleaved pairs (llama.cpp's Llama rope)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@torch.no_grad()
def rounded_copy(model, quant: str):
    """A copy of `model` whose weights are rounded as the file stores them (encode_tensor, then
    the gguf package's dequantization): what a correct file must compute."""
    import copy

    import gguf

    rounded = copy.deepcopy(model)
    for param in rounded.parameters():
        data = param.detach().float().cpu().numpy()
        encoded, qtype = encode_tensor(data, quant)
        values = gguf.quants.dequantize(encoded, qtype).reshape(data.shape)
        param.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(param.device, param.dtype))
    return rounded


def encode_tensor(data: np.ndarray, quant: str):
    """(array, GGML type): norms and biases stay F32 (as llama.cpp writes them); a row that
    does not fill whole Q8_0 blocks of 32 falls back to F16."""
    import gguf

    kind = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data.astype(np.float32), kind.F32
    qtype = {"f16": kind.F16, "bf16": kind.BF16, "q8_0": kind.Q8_0}[quant]
    if qtype == kind.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind.Q8_0][0]:
        qtype = kind.F16
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(model, tokenizer, path: Path, quant: str, name: str) -> None:
    import gguf

    model_type = architecture(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), model_type)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, tokenizer, vocab_size)
    for tensor_name, data in gguf_tensors(model, model_type):
        encoded, qtype = encode_tensor(data, quant)
        writer.add_tensor(tensor_name, encoded, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer model, with the run's
    chat template; eos is the template's end of turn, where generation must stop."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (Qwen2, SmolLM2, Llama 3); this run's "
                          f"tokenizer is {spec['model']['type']} with a {(spec.get('decoder') or {}).get('type')} decoder")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows of the embedding the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    fmt = ChatFormat(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(fmt.end_of_turn_id)
    writer.add_eot_token_id(fmt.end_of_turn_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # the template writes every special token training saw
    writer.add_add_eos_token(False)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    writer.add_chat_template(template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for how the text is split before BPE (it runs each by name)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in PRE_TOKENIZERS.items():
            if pattern == regex:
                return name
    raise ConfigError(f"the tokenizer splits text with a pre-tokenizer ({kinds}) that tunelab cannot name "
                      f"for llama.cpp (it knows gpt-2, smollm, {', '.join(PRE_TOKENIZERS)})")


# -- the parity check --------------------------------------------------------------------------
def check_gguf(path: Path, model, fmt: ChatFormat, conversations: list[list[dict]], feed: list[list[int]],
               held_out: tuple[str, list[tuple[list[int], list[int]]]], quant: str, baked: int = 0) -> dict:
    """Reload `path` with transformers' GGUF reader and compare it with `model` (the merged
    model in memory, fp32); raise ExportMismatch on any difference beyond the tolerances.
    The first `baked` positions of every prompt (baked virtual tokens) count for the exact
    check only: their logits are never read, only their keys and values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = next(model.parameters()).device
    with parsed_once():
        reader_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        start = time.perf_counter()
        reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        reloaded = reloaded.to(device).eval()
        reload_seconds = time.perf_counter() - start
    rendered = []
    for messages, want in zip(conversations, feed):
        text = reader_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got = reader_tokenizer(text)["input_ids"]  # special tokens added as a runtime adds them
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ExportMismatch(f"the GGUF's tokenizer and chat template render {got[max(0, at - 2):at + 6]} at "
                                 f"position {at} where training rendered {want[max(0, at - 2):at + 6]} "
                                 f"({len(got)} vs {len(want)} ids); nothing was written")
        rendered.append(text)

    # 1. the file holds exactly the merged weights rounded to `quant` (names, layout, Q/K order, the
    # reader's own dequantization): fp32 agreement with that rounding done in memory
    rounded = rounded_copy(model, quant)
    diffs, exact_diffs, scale = [], [], 1.0
    for ids in feed:
        want, got, exact = _logits(model, ids), _logits(reloaded, ids), _logits(rounded, ids)
        if got.shape != want.shape:
            raise ExportMismatch(f"the GGUF computes {got.shape[-1]} logits a token where the model has "
                                 f"{want.shape[-1]}; nothing was written")
        diffs.append((got[baked:] - want[baked:]).abs().max().item())
        exact_diffs.append((got - exact).abs().max().item())
        scale = max(scale, want[baked:].abs().max().item())
    del rounded
    exact_diff = max(exact_diffs)
    if not exact_diff <= EXACT_TOLERANCE * scale:
        raise ExportMismatch(f"the GGUF ({quant}) reloaded by transformers does not compute what the merged weights "
                             f"rounded to {quant} compute: max |logit difference| {exact_diff:.3g} > "
                             f"{EXACT_TOLERANCE * scale:.3g} ({EXACT_TOLERANCE} x the largest |logit| {scale:.3g}): "
                             f"a weight is misplaced or altered; nothing was written")
    # 2. what the rounding costs, against the merged model itself
    tolerance = LOGIT_TOLERANCE[quant] * scale
    diff = max(diffs)
    if not diff <= tolerance:  # also NaN
        raise ExportMismatch(f"the GGUF ({quant}) reloaded by transformers differs from the merged model: max "
                             f"|logit difference| {diff:.3g} > {tolerance:.3g} ({LOGIT_TOLERANCE[quant]} x the "
                             f"largest |logit| {scale:.3g}); nothing was written")

    stops = {fmt.end_of_turn_id}
    answers = [(greedy(model, ids, stops), greedy(reloaded, ids, stops)) for ids in feed]
    # Greedy answers part only where the merged model's top two are closer than the file's logits
    # move: at the token where they part (same prefix for both), those must stay within tolerance.
    same, near_ties = 0, []
    for ids, (want, got) in zip(feed, answers):
        if got == want:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if at is None:  # one stopped, the other went on: both chose the same tokens until then
            near_ties.append({"at": min(len(got), len(want)), "margin": 0.0, "diff": 0.0})
            continue
        prefix = ids + want[:at]
        ref_step, file_step = _logits(model, prefix)[-1], _logits(reloaded, prefix)[-1]
        step_diff = (file_step - ref_step).abs().max().item()
        margin = (ref_step[want[at]] - ref_step[got[at]]).item()
        near_ties.append({"at": at, "margin": margin, "diff": step_diff})
        if quant != "q8_0" and not step_diff <= tolerance:
            raise ExportMismatch(f"the GGUF ({quant}) answers {got} where the merged model answers {want}: they "
                                 f"part at token {at}, where the logits differ by {step_diff:.3g} > {tolerance:.3g}; "
                                 f"nothing was written")

    on, held_out = held_out
    merged_loss, exported_loss = mean_loss(model, held_out), mean_loss(reloaded, held_out)
    relative = (exported_loss - merged_loss) / merged_loss if merged_loss else 0.0
    if quant == "q8_0" and not abs(relative) <= LOSS_TOLERANCE:  # f16/bf16: the greedy answers
        raise ExportMismatch(f"the GGUF ({quant}) loss on {on} is {exported_loss:.4f} where the merged model's is "
                             f"{merged_loss:.4f} ({relative:+.2%}, more than {LOSS_TOLERANCE:.0%}); nothing was written")
    del reloaded
    parity = {"reader": "transformers", "quant": quant, "probes": len(feed), "prompt_ids_identical": True,
              "max_abs_diff_from_rounded_weights": exact_diff, "exact_tolerance": EXACT_TOLERANCE * scale,
              "max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance, "baked_positions_left_out": baked,
              "relative_tolerance": LOGIT_TOLERANCE[quant], "greedy_same": same, "greedy_near_ties": len(near_ties),
              "greedy_partings": near_ties,
              "greedy_max_new_tokens": MAX_NEW_TOKENS,
              "loss": {"on": on, "merged": merged_loss, "exported": exported_loss, "relative_diff": relative,
                       "tolerance": LOSS_TOLERANCE},
              "file_bytes": path.stat().st_size, "reload_seconds": round(reload_seconds, 2)}
    parity["llama_cpp"] = check_llama_cpp(path, model, rendered, feed, quant)
    return parity


@torch.no_grad()
def greedy(model, ids: list[int], stops: set[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Greedy decoding, unpadded, with the model's own KV cache: the same loop for both
    models, free of any generate() difference between them."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    # transformers >= 5.2x names the KV cache argument `cache`, earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {name: DynamicCache(config=model.config), "use_cache": True}
    logits = model(input_ids=torch.tensor([ids], device=device), **kv).logits
    new: list[int] = []
    while True:
        new.append(int(logits[0, -1].argmax()))
        if len(new) >= max_new_tokens or new[-1] in stops:
            return new
        logits = model(input_ids=torch.tensor([[new[-1]]], device=device), **kv).logits


@torch.no_grad()
def mean_loss(model, rows: list[tuple[list[int], list[int]]]) -> float:
    """Mean cross-entropy over every supervised token of `rows` (ids, labels)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in rows:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        target = torch.tensor(labels[1:], device=device)
        total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
        count += int((target != IGNORE).sum())
    return total / max(count, 1)


@contextmanager
def parsed_once():
    """Within it, transformers parses a GGUF once, not three times (tokenizer, config, weights:
    each parse walks every vocabulary string and merge, seconds for a 150k vocabulary), and
    builds gguf's tensor-name map once per architecture, not once per module (hundreds). Both
    are pure functions of their arguments for a file that does not change meanwhile; what
    transformers does with them is untouched, so it stays the independent reader."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def held_out_rows(config: dict, fmt: ChatFormat, prefix: list[int]) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """(what they are, rows of ids and labels) for the loss comparison, rendered as training
    did: up to HELD_OUT_ROWS of the run's held-out split; without one (or its data file gone),
    as many items of the bundled general probe set (question, reference answer), under the
    run's system prompt. Never the model's own answers: those favour the model that chose them."""
    data = config.get("data") or {}
    if data.get("val_size") and data.get("path") and Path(data["path"]).is_file():
        rows = [(row.input_ids, row.labels) for row in prepare(from_dict(DataConfig, data), fmt).val[:HELD_OUT_ROWS]]
        what = f"{len(rows)} held-out rows"
    else:
        import yaml

        items = yaml.safe_load(GENERAL_PROBES.read_text(encoding="utf-8"))["items"]
        system = [{"role": "system", "content": data["system_prompt"]}] if data.get("system_prompt") else []
        rows = []
        for item in items[::max(1, len(items) // HELD_OUT_ROWS)][:HELD_OUT_ROWS]:
            row = fmt.render(system + [{"role": "user", "content": item["question"]},
                                       {"role": "assistant", "content": item["reference"]}])
            rows.append((row.input_ids, row.labels))
        what = f"{len(rows)} general-probe reference answers"
    return what, [(prefix + ids, [IGNORE] * len(prefix) + labels) for ids, labels in rows]


def check_llama_cpp(path: Path, model, rendered: list[str], feed: list[list[int]], quant: str,
                    reader=None) -> dict | str:
    """llama.cpp as a second reader, where llama-cpp-python is installed: its tokenizer must
    give the same ids for the rendered prompts, its last-token logits must stay within the
    q8_0 bound (its matmuls round activations too) and agree on the next token.

    llama.cpp reads the file in a process of its own (`reader`, default `llama_cpp_read`): a
    crash there (seen: llama-cpp-python 0.3.36 ends with SIGSEGV evaluating any Q8_0 file on
    an AVX-512/AMX CPU, its own quantizer's output too) says nothing about the file, so it is
    reported as inconclusive and the export goes on, on transformers' check alone."""
    import importlib.util
    import multiprocessing

    if reader is None:
        if importlib.util.find_spec("llama_cpp") is None:
            return "skipped: llama-cpp-python is not installed"
        reader = llama_cpp_read
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's state
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=reader, args=(str(path), rendered, max(len(ids) for ids in feed) + 8, send))
    child.start()
    send.close()
    try:
        read = receive.recv()
    except EOFError:  # it ended without an answer
        read = None
    child.join()
    if read is None or child.exitcode != 0:
        ended = (f"signal {-child.exitcode}" if child.exitcode and child.exitcode < 0
                 else f"exit code {child.exitcode}")
        print(f"warning: llama.cpp ended with {ended} reading {path.name}: its check is inconclusive "
              f"(transformers' check passed)", file=sys.stderr)
        return f"inconclusive: llama.cpp ended with {ended} before answering"
    diffs = []
    for (got, scores), ids in zip(read, feed):
        if got != ids:
            raise ExportMismatch(f"llama.cpp tokenizes the rendered prompt as {got[:12]}... where training "
                                 f"rendered {ids[:12]}...; nothing was written")
        got_logits = torch.tensor(np.asarray(scores), dtype=torch.float32)
        want = _logits(model, ids)[-1]
        diffs.append((got_logits[:want.shape[0]] - want).abs().max().item())
        scale = max(1.0, want.abs().max().item())
        if not diffs[-1] <= LOGIT_TOLERANCE["q8_0"] * scale or int(got_logits.argmax()) != int(want.argmax()):
            raise ExportMismatch(f"llama.cpp's next-token logits differ from the merged model's by {diffs[-1]:.3g} "
                                 f"(scale {scale:.3g}); nothing was written")
    return {"reader": "llama.cpp", "prompt_ids_identical": True, "max_abs_diff_last_token": max(diffs)}


def llama_cpp_read(path: str, rendered: list[str], n_ctx: int, send) -> None:
    """In its own process: llama.cpp's token ids and last-token logits for each rendered
    prompt, sent as [(ids, logits)]."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False)
    out = []
    for text in rendered:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: as the file says
        llm.reset()
        llm.eval(ids)
        out.append((ids, np.array(llm.scores[len(ids) - 1], dtype=np.float32).tolist()))
    send.send(out)
    send.close()
