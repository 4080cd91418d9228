"""The signatures of the verbs whose modules import torch at the top (train, merge, export).

`tunelab VERB --help` and every flag check must answer in a fraction of a second, before
torch, transformers and peft are imported (10-25 s on a small shared machine). jsonargparse
builds the flags from a function's signature and docstring, so these stand-ins carry the
real functions' signatures and docstrings, and import the real function only when the verb
runs. tests/test_cli.py checks that each one matches its real function exactly and that
parsing imports none of the heavy stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from .config import DataConfig, MitigateConfig, ModelConfig, TrainConfig
from .methods import MethodConfig


def train(model: ModelConfig, data: DataConfig, method: MethodConfig = MethodConfig(),
          train: TrainConfig = TrainConfig(), mitigate: MitigateConfig = MitigateConfig(),
          out: str = "runs/run", resume: bool = True, allow_config_change: bool = False) -> Path:
    """Fine-tune `model` on `data` with `method`; write a self-describing run directory.

    Args:
        model: the base model.
        data: the training data and how it is rendered.
        method: the fine-tuning method and its options.
        train: optimisation, checkpointing and logging.
        mitigate: keeping general ability: self-replay, KL to the base, checkpoint choice
            (docs/MITIGATION.md); the defaults change nothing.
        out: the run directory.
        resume: continue from the newest complete checkpoint in `out`, if any (exactly: the
            same losses and weights as an uninterrupted run). A changed base model or data
            file is refused; `false` discards the checkpoints and starts over.
        allow_config_change: resume even though settings differ from those the checkpoints
            were trained with (the differences are listed when this is off).
    """
    from .train import train as run

    return run(model, data, method, train, mitigate, out=out, resume=resume,
               allow_config_change=allow_config_change)


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
    from .merge import merge as export

    return export(run, out=out, bake=bake, dtype=dtype, precision=precision, device=device,
                  max_shard_size=max_shard_size, overwrite=overwrite, model=model)


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
    from .export import export as run_export

    return run_export(run, format=format, quant=quant, out=out, name=name, overwrite=overwrite, device=device)
