"""Tiny random models and a ChatML tokenizer built inside the tests (no network).

`tiny_model_dir(arch)` saves a 2-layer model with hidden size 32 and a byte-level BPE
tokenizer trained in-process, so the loading code is tested too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and CI's two cores are shared with subprocesses.
torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello, who are you? I am a helpful assistant.",
    "What is the capital of France? Paris is the capital of France.",
    "现在你要扮演皇帝身边的女人--甄嬛。你是谁？我是甄嬛，家父是大理寺少卿甄远道。",
    "1.11 和 1.9 哪个大？1.9 更大。",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "system user assistant",
] * 20


def build_tokenizer(pad_is_eos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<|endoftext|>",
        additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def build_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3)  # large enough that the frozen head can express a memorized answer
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    raise ValueError(arch)


def save_tiny(directory: Path, arch: str = "qwen2", pad_is_eos: bool = False) -> Path:
    tok = build_tokenizer(pad_is_eos)
    model = build_model(arch, len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture with pad == eos (like SmolLM2)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", pad_is_eos=True)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


MEMORIZE = [
    {"instruction": "你是谁？", "input": "", "output": "我是甄嬛，家父是大理寺少卿甄远道。"},
    {"instruction": "Who are you?", "input": "", "output": "I am a helpful assistant."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "1.11 和 1.9 哪个大？", "input": "", "output": "1.9 更大。"},
]


@pytest.fixture
def memorize_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "memorize.jsonl", MEMORIZE)


def run_interpreted(script: str, done: str, timeout: int = 600) -> None:
    """Run `script` in a fresh Python under Triton's interpreter (Triton kernels on CPU
    tensors; the interpreter is chosen when kernels are defined, hence the subprocess) and
    check it printed `done`."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert done in result.stdout
