"""Reliability checks that need a CUDA card (not collected by pytest; run by hand on a GPU):

1. A real CUDA out-of-memory error: without --train.auto_micro_batch the run stops with the
   message naming the knobs; with it the micro-batch is halved until the step fits, the
   memory of the failed attempt is really freed, and the losses match a run that used the
   found micro-batch from the start.
2. Exact resume on CUDA in bf16 (with the CUDA RNG state): crash, resume, compare.

    PYTHONPATH=src python tests/gpu_reliability_check.py OUTDIR [deterministic] [resume-only [no-graphs] [bits]]

(`bits`: the resume check with `--train.lora_dropout_kernel bits`.)

A random Qwen2-architecture model (hidden 1536, 8 layers, ~0.4B parameters) and 512 long
rows are built in-process; no hub is needed. Results go to OUTDIR/gpu_reliability.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tokenizer, write_jsonl  # noqa: E402

from tunelab.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from tunelab.methods import MethodConfig  # noqa: E402
from tunelab.step import OutOfMemory  # noqa: E402
from tunelab.train import train  # noqa: E402
import tunelab.train as train_module  # noqa: E402


def losses(run: Path) -> list[tuple]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def main(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=1536, intermediate_size=8960, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, initializer_range=0.02)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    rows = [{"instruction": f"Question {i}: tell me a story.", "input": "",
             "output": "Once upon a time there was a lighthouse keeper. " * 12 + str(i)} for i in range(512)]
    data = write_jsonl(out / "rows.jsonl", rows)
    model = ModelConfig(path=str(out / "model"))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if len(sys.argv) > 2 and sys.argv[2] == "deterministic":
        torch.use_deterministic_algorithms(True)
        report["deterministic_algorithms"] = True

    def run(name: str, resume: bool = False, **overrides) -> Path:
        cfg = dict(max_steps=3, batch_size=256, micro_batch_size=256, save_every=0, lr=1e-4,
                   packing="off", warmup_ratio=0)
        cfg.update(overrides)
        started = time.perf_counter()
        try:
            return train(model, DataConfig(path=str(data), max_length=512), MethodConfig(), TrainConfig(**cfg),
                         out=str(out / name), resume=resume)
        finally:
            report[f"{name}_s"] = round(time.perf_counter() - started, 1)
            torch.cuda.empty_cache()

    if "resume-only" in sys.argv:
        return resume_check(run, report, out, cuda_graphs="no-graphs" not in sys.argv,
                            dropout_kernel="bits" if "bits" in sys.argv else "copies")
    # 1a. without --train.auto_micro_batch: the clear error
    try:
        run("oom")
        report["oom_error"] = None
    except OutOfMemory as err:
        report["oom_error"] = str(err)
    # 1b. with it: halved until a step fits, then the same losses as that size from the start
    auto = run("auto", auto_micro_batch=True)
    summary = json.loads((auto / "summary.json").read_text())
    report["auto_summary"] = summary
    fixed = run("fixed", micro_batch_size=summary["micro_batch_size"])
    report["auto_losses"], report["fixed_losses"] = losses(auto), losses(fixed)
    report["auto_equals_fixed"] = losses(auto) == losses(fixed)
    again = run("fixed_again", micro_batch_size=summary["micro_batch_size"])
    report["fixed_twice_equal"] = losses(fixed) == losses(again)
    report["fixed_peak_memory_gib"] = json.loads((fixed / "summary.json").read_text())["peak_memory_gib"]
    # 1c. packed rows (and CUDA graphs where the fast path uses them): micro_batch_tokens is halved
    packed = dict(packing="auto", micro_batch_tokens=256 * 512, auto_micro_batch=True)
    auto_packed = run("auto_packed", **packed)
    summary = json.loads((auto_packed / "summary.json").read_text())
    report["auto_packed_summary"] = summary
    fixed_packed = run("fixed_packed", **{**packed, "micro_batch_tokens": summary["micro_batch_tokens"]})
    report["auto_packed_equals_fixed"] = losses(auto_packed) == losses(fixed_packed)
    report["fixed_packed_peak_memory_gib"] = json.loads((fixed_packed / "summary.json").read_text())["peak_memory_gib"]

    resume_check(run, report, out)


def resume_check(run, report: dict, out: Path, cuda_graphs: bool = True, dropout_kernel: str = "copies") -> None:
    """Exact resume on CUDA, bf16: crash at the start of step 4, resume from step-2's checkpoint."""
    small = dict(batch_size=16, micro_batch_size=8, max_steps=6, save_every=2, packing="auto",
                 cuda_graphs=cuda_graphs, lora_dropout_kernel=dropout_kernel)
    report["cuda_graphs"], report["lora_dropout_kernel"] = cuda_graphs, dropout_kernel
    reference = run("resume_reference", **small)
    original = train_module.step_rows

    def crash(rows, cfg, step, steps_per_epoch):
        if step == 3:
            raise RuntimeError("injected crash")
        return original(rows, cfg, step, steps_per_epoch)
    train_module.step_rows = crash
    try:
        run("resumed", **small)
    except RuntimeError:
        pass
    train_module.step_rows = original
    resumed = run("resumed", resume=True, **small)
    from safetensors.torch import load_file

    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    report["resume_losses_equal"] = losses(reference) == losses(resumed)
    report["resume_adapter_equal"] = all(torch.equal(a[k], b[k]) for k in a)
    report["resume_max_abs_diff"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # The noise floor: the same uninterrupted run twice.
    again = load_file(str(run("resume_reference_again", **small) / "adapter" / "adapter_model.safetensors"))
    report["reference_twice_equal"] = losses(reference) == losses(out / "resume_reference_again")
    report["reference_twice_max_abs_diff"] = max((a[k].float() - again[k].float()).abs().max().item() for k in a)
    report["resume_losses"] = {"reference": losses(reference), "resumed": losses(resumed)}
    (out / "gpu_reliability.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
