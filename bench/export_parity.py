"""Export parity: what `tunelab export` measures when it reads its own GGUF back, per format and model.

    # CPU: tiny random Qwen2 and Llama models, and real SmolLM2-135M-Instruct when it is in the
    # cache (`tunelab pull smollm2-135m-instruct`); LoRA merged and P-Tuning baked, f16/bf16/q8_0
    python bench/export_parity.py cpu --json bench/results/export_parity_cpu.json

    # the table in docs/EXPORT.md, from a results file
    python bench/export_parity.py table bench/results/export_parity_cpu.json

    # GPU: a random-weight Qwen2-0.5B or 1.5B shape with the Qwen2 tokenizer, LoRA, each format:
    # export + parity check timed on the card
    python bench/export_parity.py shape --shape qwen2-1.5b --tokenizer qwen2/ --device cuda \
        --json bench/results/export_parity_h200.json

Every figure in docs/EXPORT.md comes from one of these files. The adapters are random (B drawn
with a visible effect), not trained: the check compares the file with the merged model, so
what the adapter learned does not matter, only that it changes the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import SHAPES, SYSTEM  # noqa: E402

QUANTS = ["f16", "bf16", "q8_0"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_run(root: Path, base: Path, kind: str, lora_b_std: float) -> Path:
    """A finished run directory on `base` with a random LoRA (B ~ N(0, lora_b_std)) or P-Tuning adapter."""
    from peft import LoraConfig, PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / f"run-{kind}"
    torch.manual_seed(0)
    config = (LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM") if kind == "lora" else
              PromptEncoderConfig(num_virtual_tokens=10, encoder_hidden_size=128,
                                  encoder_reparameterization_type="MLP", task_type="CAUSAL_LM"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, lora_b_std)
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    spec = {"model": {"path": str(base), "dtype": "fp32", "device": "cpu"},
            "method": {"name": "lora" if kind == "lora" else "ptuning"}, "data": {"system_prompt": SYSTEM}}
    (run / "config.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    (run / "DONE").write_text("ok\n")
    return run


def export_all(run: Path, quants: list[str], device: str) -> dict:
    from tunelab.export import export, sidecar
    from tunelab.merge import ExportMismatch

    results = {}
    for quant in quants:
        start = time.perf_counter()
        try:
            info = json.loads(sidecar(export(str(run), quant=quant, device=device)).read_text())
        except ExportMismatch as err:  # recorded, not hidden: the table shows the failure
            results[quant] = {"failed": str(err)}
            continue
        results[quant] = dict(info["parity"], total_seconds=round(time.perf_counter() - start, 2),
                              merge_max_abs_diff=info["max_abs_diff"], kind=info["kind"])
    return results


def tiny_base(directory: Path, arch: str) -> Path:
    """The tests' tiny model (2 layers, hidden 32) with the tests' ChatML BPE tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import save_tiny

    return save_tiny(directory, arch, pad_is_eos=arch == "llama")


def cpu(args) -> dict:
    from tunelab.pull import cache_root

    torch.set_num_threads(args.threads)
    out = {"device": "cpu", "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bases = {f"tiny-{arch}": (tiny_base(Path(tmp) / arch, arch), 0.05) for arch in ("qwen2", "llama")}
        smollm2 = cache_root() / "models" / "smollm2-135m-instruct"
        if (smollm2 / "tunelab_source.json").is_file():
            bases["smollm2-135m-instruct"] = (smollm2, 0.002)
        else:
            print(f"no {smollm2}: `tunelab pull smollm2-135m-instruct` adds the real model", file=sys.stderr)
        for name in args.models or bases:
            base, std = bases[name]
            for kind in ("lora", "ptuning"):
                run = make_run(Path(tmp) / name, base, kind, std)
                out["models"].setdefault(name, {})[kind] = export_all(run, args.quants, "cpu")
                print(name, kind, json.dumps(out["models"][name][kind]), flush=True)
                shutil.rmtree(run)
    return out


def shape(args) -> dict:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    spec = dict(SHAPES[args.shape])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = Path(tmp) / "base"
        start = time.perf_counter()
        model = Qwen2ForCausalLM(Qwen2Config(**spec, max_position_embeddings=32768))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        run = make_run(Path(tmp), base, "lora", 0.02)
        prepared = time.perf_counter() - start
        device = torch.device(args.device)
        return {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "build_seconds": round(prepared, 1), "lora": export_all(run, args.quants, args.device)}


def llama_cpp_cell(read) -> str:
    """The llama.cpp check in a table cell: same ids and the last token's max logit difference,
    or why it did not run."""
    if isinstance(read, dict):
        return f"same ids, {read['max_abs_diff_last_token']:.3g}"
    return (read or "not recorded").split(":")[0]


def table(results: dict) -> str:
    """docs/EXPORT.md's table from a results file (`python bench/export_parity.py table FILE.json`)."""
    lines = ["| model | adapter | format | file MiB | vs rounded weights | max abs logit diff (scale) | bound "
             "| greedy same / parted within bound | loss merged -> file (on) | check s | llama.cpp |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- |"]
    models = results.get("models") or {results["shape"]: {"lora": results["lora"]}}
    for model, kinds in models.items():
        for kind, quants in kinds.items():
            for quant, r in quants.items():
                if "failed" in r:
                    lines.append(f"| {model} | {kind} | {quant} | | | FAILED: {r['failed'][:120]} | | | | | |")
                    continue
                loss = r["loss"]
                lines.append(
                    f"| {model} | {kind} | {quant} | {r['file_bytes'] / 2**20:.2f} | "
                    f"{r['max_abs_diff_from_rounded_weights']:.2g} | {r['max_abs_diff']:.3g} ({r['logit_scale']:.3g}) | "
                    f"{r['tolerance']:.3g} | {r['greedy_same']}/{r['probes']}, {r['greedy_near_ties']} | "
                    f"{loss['merged']:.4f} -> {loss['exported']:.4f} ({loss['relative_diff']:+.2%}; {loss['on']}) | "
                    f"{r['seconds']['check']:.1f} | {llama_cpp_cell(r.get('llama_cpp'))} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["table"]:
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu", help="tiny Qwen2 and Llama, and SmolLM2-135M if cached")
    c.add_argument("--models", nargs="*", help="a subset: tiny-qwen2 tiny-llama smollm2-135m-instruct")
    c.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("shape", help="a random-weight Qwen2 of a published shape, timed on a device")
    s.add_argument("--shape", default="qwen2-0.5b", choices=list(SHAPES), help="tiny: a CPU smoke run of the harness")
    s.add_argument("--tokenizer", required=True, help="a Qwen2 tokenizer directory")
    s.add_argument("--device", default="cuda")
    s.add_argument("--workdir", default=None, help="where the base and the run are written (several GB)")
    for p in (c, s):
        p.add_argument("--quants", nargs="*", default=QUANTS)
        p.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = cpu(args) if args.mode == "cpu" else shape(args)
    result["command"] = " ".join(["python"] + sys.argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
