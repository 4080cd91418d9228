"""What mitigation costs a training step: one demo step (16 persona rows) timed plain, with
replay (16 + 4 rows of the base's own answers), with replay + KL 0.1, and for P-Tuning, the
variants interleaved so a shared machine's load drift hits each alike (docs/MITIGATION.md).

    python bench/mitigation_cost.py --model DIR [--reps 3] [--json OUT.json]

Forward + backward through `train.queue_step` (no optimizer update); the replay answers are
generated once (or read from the tunelab cache).
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from tunelab import accel, mitigate as M  # noqa: E402
from tunelab.config import DataConfig, MitigateConfig, ModelConfig, TrainConfig  # noqa: E402
from tunelab.data import ChatFormat, prepare  # noqa: E402
from tunelab.data.replay import mix  # noqa: E402
from tunelab.methods import MethodConfig, selected  # noqa: E402
from tunelab.models import fingerprint, load_model, load_tokenizer  # noqa: E402
from tunelab.step import queue_step  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", required=True,
                    help="local HF model directory (SmolLM2-135M-Instruct from `tunelab pull`)")
parser.add_argument("--reps", type=int, default=3)
parser.add_argument("--json")
args = parser.parse_args()
REPO = ROOT
model_cfg = ModelConfig(path=args.model)
data = DataConfig(path=str(REPO / "src/tunelab/assets/demo/persona.jsonl"),
                  system_prompt=(REPO / "src/tunelab/assets/demo/system_prompt.txt").read_text().strip(),
                  val_size=24, max_length=128)
cfg = TrainConfig(batch_size=16, micro_batch_size=16)
tok = load_tokenizer(model_cfg); fmt = ChatFormat(tok)
prepared = prepare(data, fmt)
cpu = torch.device("cpu")
torch.manual_seed(0)
nets = {}
for name in ("lora", "ptuning"):
    base = load_model(model_cfg, cpu)
    if name == "lora":
        replay, stats = M.replay_rows(MitigateConfig(replay=0.2, replay_prompts=96, replay_max_new_tokens=64),
                                      data, fmt, fingerprint(model_cfg), base, cpu)
    m, opts = selected(MethodConfig(name=name))
    net = m.apply(base, opts); net.train()
    fast = accel.setup(net, "auto", m.capabilities.supports_packing, cpu, nullcontext(), tok.pad_token_id)
    nets[name] = (net, fast, [p for p in net.parameters() if p.requires_grad])
rows = prepared.train[:16]
variants = {
    "lora": ("lora", rows, 0.0),
    "lora+replay": ("lora", mix(rows, replay, 0.2, 16, 0, 42), 0.0),
    "lora+replay+kl": ("lora", mix(rows, replay, 0.2, 16, 0, 42, "replay"), 0.1),
    "ptuning": ("ptuning", rows, 0.0),
}
times = {k: [] for k in variants}
for rep in range(args.reps):
    for k, (name, step_rows, kl) in variants.items():
        net, fast, params = nets[name]
        fast.kl = kl
        t = time.perf_counter()
        queue_step(net, step_rows, cfg, fast, cpu, nullcontext(), params)
        times[k].append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    print(rep, {k: round(v[-1], 1) for k, v in times.items()}, os.getloadavg(), flush=True)
out = {k: {"median_s": round(statistics.median(v), 2), "all": [round(x, 2) for x in v],
           "ratio_to_lora": round(statistics.median(v) / statistics.median(times["lora"]), 2),
           "tokens": sum(len(r.input_ids) for r in variants[k][1])} for k, v in times.items()}
out["replay_stats"] = {k: v for k, v in stats.items() if k != "key"}
print(json.dumps(out, indent=1))
if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
