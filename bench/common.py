"""Shared pieces of the benchmarks: model shapes, random-weight models, the two renderings of
the data, the card's measured bf16 matmul peak, and timing.

Models are random-weight Qwen2 architectures of the published shapes: speed and memory
depend on the shape, not on the weights, and no weights need to travel to the GPU machine.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
MAX_LENGTH = 384

SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    # CPU mode: the harness end to end in seconds (vocabulary set from the tokenizer)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype, vocab_size: int | None = None,
                seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-weight Qwen2ForCausalLM of `shape`, built directly on `device` in `dtype`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    if vocab_size is not None and "vocab_size" not in spec:
        spec["vocab_size"] = vocab_size
    config = Qwen2Config(**spec, max_position_embeddings=4096, use_cache=False)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def saved_random_base(shape: str, tokenizer_dir: str, device_arg: str, dtype_arg: str, base: Path):
    """A random-weight model of `shape` saved with its tokenizer to `base` as a tunelab base model
    (cache on, the tokenizer's eos and pad): (model, tokenizer, the run config's `model` entry).
    `device_arg` auto picks CUDA when present; `dtype_arg` auto is bf16 on CUDA, else fp32."""
    from transformers import AutoTokenizer

    device = torch.device("cuda" if device_arg == "auto" and torch.cuda.is_available()
                          else "cpu" if device_arg == "auto" else device_arg)
    dtype = torch.bfloat16 if dtype_arg == "bf16" or (dtype_arg == "auto" and device.type == "cuda") \
        else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model(shape, device, dtype, vocab_size=len(tokenizer))
    model.config.use_cache = True
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model_cfg = {"path": str(base), "dtype": "bf16" if dtype == torch.bfloat16 else "fp32", "device": str(device)}
    return model, tokenizer, model_cfg


def random_runs(shape: str, tokenizer_dir: str, device_arg: str, dtype_arg: str, root: Path,
                runs: dict[str, str], system_prompt: str | None = None) -> list[str]:
    """A random-weight base of `shape` saved under root/base (`saved_random_base`) and one run
    directory per `runs` entry (name -> method) on it, with random adapters, laid out as `tunelab
    train` writes them: the timings of serving and evaluation need no trained weights."""
    import yaml

    from tunelab.methods import get

    model, tokenizer, model_cfg = saved_random_base(shape, tokenizer_dir, device_arg, dtype_arg, root / "base")
    device = torch.device(model_cfg["device"])
    made = []
    for name, method_name in runs.items():
        method = get(method_name)
        torch.manual_seed(len(made) + 1)
        wrapped = method.apply(model, method.config_cls())
        with torch.no_grad():  # LoRA starts at B = 0, i.e. no change: make it change the model
            for param_name, param in wrapped.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.02)
        run = root / name
        method.save(wrapped, run / "adapter")
        tokenizer.save_pretrained(run / "tokenizer")
        config = {"model": model_cfg, "method": {"name": method_name}}
        if system_prompt:
            config["data"] = {"system_prompt": system_prompt}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "DONE").write_text("ok\n")
        made.append(str(run))
        if hasattr(wrapped, "unload") and not wrapped.active_peft_config.is_prompt_learning:
            model = wrapped.unload()  # the base without LoRA layers, for the next adapter
    del model, wrapped
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return made


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head is one Parameter, counted once


def reference_features(path: str, tokenizer) -> list[dict]:
    """The reference rendering: hand-written ChatML, labels -100 on the prompt, the response
    ids then the pad id appended, cut at 384 from the right (the recipe's `process_func`)."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    features = []
    for row in rows:
        prompt = tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                           f"{row['instruction'] + row['input']}<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)
        response = tokenizer(row["output"], add_special_tokens=False)
        ids = prompt["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        mask = prompt["attention_mask"] + response["attention_mask"] + [1]
        labels = [-100] * len(prompt["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        features.append({"input_ids": ids[:MAX_LENGTH], "attention_mask": mask[:MAX_LENGTH],
                         "labels": labels[:MAX_LENGTH]})
    return features


def tunelab_rows(path: str, tokenizer):
    """tunelab's rendering: the tokenizer's chat template through ChatFormat (ends at <|im_end|>)."""
    from tunelab.config import DataConfig
    from tunelab.data import ChatFormat, load_examples, render_all

    examples = load_examples(path, SYSTEM).examples
    rows, _, _ = render_all(examples, ChatFormat(tokenizer), DataConfig(path=path, max_length=MAX_LENGTH))
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Median bf16 TFLOP/s of an n x n x n product on random data (the MFU denominator)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


@contextmanager
def fresh_memory(device: torch.device):
    """Free what earlier cases left and count this case's peak from zero."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _LEFTOVER[device] = torch.cuda.memory_allocated(device)  # not freed by earlier cases
    yield
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_LEFTOVER: dict = {}


def peak_gib(device: torch.device) -> float:
    """This case's peak: the allocator's peak less what earlier cases still held at its start."""
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) - _LEFTOVER.get(device, 0)) / 2**30


class Clock:
    """Wall time of the steps after warmup, the device synchronized at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.seconds = device, None, None

    def begin(self) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def end(self) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
