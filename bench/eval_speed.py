"""Evaluation speed: the wall time of a full `tunelab eval` of a base model and its runs.

What is timed is `tunelab.evaluate.runner.evaluate` itself (what `tunelab eval` and
`tunelab experiment` call): loading the base and the adapters, then every suite for every
model: in_domain (held-out loss, then generated answers vs references), persona probes,
and the bundled general-ability probes asked without and with the persona system prompt.
Each suite's time and the number of answers and answer tokens are recorded, with every
answer, so two runs of this script (before and after a change, or a rerun) can be compared
answer by answer: `python bench/eval_speed.py --compare A.json B.json`.

Two sources of models:
- `--runs RUN ...`: real run directories (their base, data split and system prompt come
  from the first run's config), e.g. SmolLM2-135M-Instruct runs on the CPU;
- none given: a random-weight Qwen2 of `--shape` with a LoRA and a P-Tuning adapter built
  in-process (random, non-zero), written as run directories under a temporary folder, so
  nothing but a tokenizer and the data need to travel. Random weights rarely end a turn,
  so nearly every answer runs to --max-new-tokens: the heavy case.

    python bench/eval_speed.py --runs runs/evalspeed/lora runs/evalspeed/ptuning \
        --persona-probes examples/huanhuan_probes.yaml --out eval_cpu.json        # CPU, real runs
    python bench/eval_speed.py --gpu --out OUT.json                               # GPU, qwen2-1.5b shape
    python bench/eval_speed.py --shape tiny --device cpu --tokenizer TOK --data D.json ...  # the test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT / "src"), str(BENCH)]  # runs from a checkout too

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="*", default=[], help="run directories (default: build random adapters)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU preset: --device cuda, bf16, qwen2-1.5b shape, .carry/qwen2, .carry/huanhuan.json")
    p.add_argument("--shape", default="qwen2-1.5b", help="random-weight shape (bench/common.py) without --runs")
    p.add_argument("--tokenizer", default=str(ROOT / ".carry" / "qwen2"), help="tokenizer dir (random weights)")
    p.add_argument("--data", default=None,
                   help="in-domain data (default: the runs' data; random weights: .carry/huanhuan.json)")
    p.add_argument("--val-size", type=float, default=300, help="held-out rows of --data")
    p.add_argument("--system-prompt", default=None, help="persona system prompt (default: the runs', else 甄嬛)")
    p.add_argument("--persona-probes", default=str(ROOT / "examples" / "huanhuan_probes.yaml"))
    p.add_argument("--suites", nargs="+", default=["in_domain", "persona", "general"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: 32, --gpu 64)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="items per suite (default: all)")
    p.add_argument("--decode", default="auto", choices=["auto", "static", "dynamic"],
                   help="the Engine's decoding path (auto: static with CUDA graphs on a GPU, dynamic on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results (JSON) here")
    p.add_argument("--report", default=None,
                   help="keep the evaluation's own output here (results.json, report.md, report.html)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare the answers of two result files")
    args = p.parse_args(argv)
    if args.gpu:
        args.device = "cuda" if args.device == "auto" else args.device
    if args.batch_size is None:
        args.batch_size = 64 if args.gpu else 32
    if not args.runs and args.data is None:
        args.data = str(ROOT / ".carry" / "huanhuan.json")
    return args


def build_runs(args, root: Path) -> list[str]:
    """A random-weight base of `args.shape` saved under root/base, and a LoRA and a P-Tuning
    run directory on it (random adapters, as `tunelab train` would lay them out)."""
    from common import random_runs

    return random_runs(args.shape, args.tokenizer, args.device, args.dtype, root,
                       {"lora": "lora", "ptuning": "ptuning"})


class Timers:
    """Wraps the suites and Engine.complete to record where the time goes, without changing them."""

    def __init__(self):
        self.suites: dict[str, float] = {}
        self.answers = 0
        self.answer_tokens = 0
        self.generate_s = 0.0
        self.score_s = 0.0  # teacher-forced scoring: held-out loss, multiple-choice options
        self.scored_rows = 0
        self._scoring = False  # last_logits may call forward: count the outer call only

    @contextmanager
    def installed(self):
        from tunelab.evaluate import runner
        from tunelab.generate import Engine

        modules = (runner.in_domain, runner.persona, runner.general, runner.benchmarks_suite)
        originals = [m.run for m in modules] + [Engine.forward, Engine.last_logits,
                                                runner.in_domain.score_rows, Engine.complete]
        for module in modules:
            module.run = self._timed(module.__name__.rsplit(".", 1)[-1], module.run)
        runner.in_domain.score_rows = self._timed("in_domain_loss", runner.in_domain.score_rows)
        complete = Engine.complete

        def counted(engine, prompts, *a, **k):
            start = time.perf_counter()
            answers = complete(engine, prompts, *a, **k)
            self._sync(engine.device)
            self.generate_s += time.perf_counter() - start
            self.answers += len(answers)
            self.answer_tokens += sum(len(x) for x in answers)
            return answers

        Engine.complete = counted
        Engine.forward, Engine.last_logits = self._scorer(Engine.forward), self._scorer(Engine.last_logits)
        try:
            yield self
        finally:
            for module, fn in zip(modules, originals):
                module.run = fn
            Engine.forward, Engine.last_logits, runner.in_domain.score_rows, Engine.complete = originals[-4:]

    def _scorer(self, fn):
        def scored(engine, prompts, *a, **k):
            if self._scoring:
                return fn(engine, prompts, *a, **k)
            self._scoring = True
            start = time.perf_counter()
            try:
                out = fn(engine, prompts, *a, **k)
                self._sync(engine.device)
            finally:
                self._scoring = False
            self.score_s += time.perf_counter() - start
            self.scored_rows += len(prompts)
            return out
        return scored

    def _timed(self, name, fn):
        def run(engine, *a, **k):
            start = time.perf_counter()
            out = fn(engine, *a, **k)
            self._sync(engine.device)
            self.suites[name] = self.suites.get(name, 0.0) + time.perf_counter() - start
            return out
        return run

    @staticmethod
    def _sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


@contextmanager
def decoding(mode: str):
    """Every Engine built meanwhile decodes through `mode` (auto: its own default)."""
    from tunelab.generate import Engine

    init = Engine.__init__

    def patched(engine, *a, **k):
        init(engine, *a, **k)
        if mode != "auto":
            engine.static = mode == "static"

    Engine.__init__ = patched
    try:
        yield
    finally:
        Engine.__init__ = init


def answers_of(report: dict) -> dict[str, dict[str, str]]:
    """suite/id -> model -> answer text, from the report's side-by-side rows."""
    return {f"{row['suite']}/{row['id']}": row["answers"] for row in report["answers"]}


def losses_of(report: dict) -> dict[str, float]:
    suite = report["suites"].get("in_domain_loss")
    return {m: s["mean"] for m, s in suite["scores"].items()} if suite else {}


def run(args) -> dict:
    from tunelab.config import DataConfig, GenerationConfig
    from tunelab.evaluate.runner import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    timers = Timers()
    with tempfile.TemporaryDirectory() as tmp, timers.installed(), decoding(args.decode):
        runs, build_s = args.runs, 0.0
        if not runs:
            start = time.perf_counter()
            runs = build_runs(args, Path(tmp))
            build_s = time.perf_counter() - start
        data = None
        if args.data:
            val = int(args.val_size) if args.val_size >= 1 else args.val_size
            data = DataConfig(path=args.data, system_prompt=args.system_prompt or SYSTEM, val_size=val)
        system = args.system_prompt or (None if args.runs else SYSTEM)
        start = time.perf_counter()
        report = evaluate(runs=runs, suites=args.suites, persona_probes=args.persona_probes, data=data,
                          system_prompt=system, gen=GenerationConfig(max_new_tokens=args.max_new_tokens),
                          batch_size=args.batch_size, limit=args.limit, out=args.report or str(Path(tmp) / "eval"))
        seconds = time.perf_counter() - start
    device = "cpu"
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.cuda.get_device_name(0)
    answers = answers_of(report)
    digest = hashlib.sha256(json.dumps(answers, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/eval_speed.py"] + (args.argv or [])),
        "device": device, "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "models": [m["name"] for m in report["models"]], "runs": [str(r) for r in args.runs] or args.shape,
        "batch_size": args.batch_size, "decode": args.decode, "max_new_tokens": args.max_new_tokens, "limit": args.limit,
        "seconds": round(seconds, 1), "build_runs_s": round(build_s, 1),
        "suite_seconds": {k: round(v, 3) for k, v in timers.suites.items()},
        "generate_seconds": round(timers.generate_s, 1), "answers": timers.answers,
        "answer_tokens": timers.answer_tokens,
        "seconds_per_answer": round(timers.generate_s / max(1, timers.answers), 4),
        "score_seconds": round(timers.score_s, 3), "scored_rows": timers.scored_rows,
        "in_domain_loss": losses_of(report),
        "scores": {name: {m: s["mean"] for m, s in suite["scores"].items()}
                   for name, suite in report["suites"].items()},
        "answers_sha256": digest,
        "answer_texts": answers,
    }


def compare(a_path: str, b_path: str) -> dict:
    """How many answers two result files share, and the losses and scores side by side."""
    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (a_path, b_path))
    keys = sorted(set(a["answer_texts"]) & set(b["answer_texts"]))
    total = same = 0
    differing = []
    for key in keys:
        for model, text in a["answer_texts"][key].items():
            other = b["answer_texts"][key].get(model)
            total += 1
            if other == text:
                same += 1
            else:
                differing.append({"item": key, "model": model, "a": text, "b": other})
    result = {"answers_compared": total, "identical": same, "differing": differing,
              "seconds": [a["seconds"], b["seconds"]],
              "in_domain_loss": [a["in_domain_loss"], b["in_domain_loss"]],
              "scores": {s: [a["scores"][s], b["scores"].get(s)] for s in a["scores"]}}
    print(f"{same} of {total} answers identical; seconds {a['seconds']} -> {b['seconds']}")
    for d in differing[:10]:
        print(f"  {d['item']} [{d['model']}]\n    A: {d['a']!r}\n    B: {d['b']!r}")
    for suite, (x, y) in result["scores"].items():
        print(f"  {suite}: {x} -> {y}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.compare:
        return compare(*args.compare)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "answer_texts"}, indent=1, ensure_ascii=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
