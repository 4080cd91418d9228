"""The run directory: its layout, crash-safe checkpoints, and loading a finished run.

A run directory describes itself (config.yaml, tokenizer, adapter, metrics), so chat,
merge and eval need nothing but its path. Every directory is written under a temporary
name, flushed, marked complete and renamed: a crash leaves either the old state or the
new one, never a directory that looks complete and fails to load.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

COMPLETE = "COMPLETE"


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    data_stats = property(lambda self: self.root / "data_stats.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    adapter = property(lambda self: self.root / "adapter")
    tokenizer = property(lambda self: self.root / "tokenizer")
    checkpoints = property(lambda self: self.root / "checkpoints")
    done = property(lambda self: self.root / "DONE")

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root} is not a tunelab run directory (no config.yaml)")
        return yaml.safe_load(self.config.read_text())

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints with a completion marker, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.name.startswith("step-") and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, fill) -> Path:
    """Create directory `final` by calling fill(tmp_dir), then flush, mark and rename it.

    If `fill` fails (disk full, a non-finite tensor) the temporary directory is removed and
    whatever was at `final` before is untouched.
    """
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def assert_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to write non-finite trainable weights."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise FloatingPointError(f"refusing to save {what}: parameter {name} has NaN/Inf values")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDir, step: int, model, method, optimizer, scheduler, state: dict,
                    keep: int) -> Path:
    """Everything needed to continue exactly: weights, optimizer, schedule, RNG, position."""
    assert_finite(model, f"checkpoint step {step}")

    def fill(tmp: Path) -> None:
        method.save(model, tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    path = write_atomically(run.checkpoints / f"step-{step:07d}", fill)
    for old in run.complete_checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    # Our own file, but still loaded without running pickle code.
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def load_run(path: str | Path, device: torch.device | None = None, adapter: bool = True):
    """(model, tokenizer, run config) of a finished run: its base with its adapter applied."""
    from .config import ModelConfig, from_dict
    from .methods import get
    from .models import load_model
    from transformers import AutoTokenizer

    run = RunDir(Path(path))
    config = run.read_config()
    if not run.adapter.is_dir():
        raise FileNotFoundError(f"{run.root} has no adapter/ yet: the run has not finished "
                                f"(resume it with `tunelab train --config {run.config}`)")
    model_cfg = from_dict(ModelConfig, config["model"])
    model = load_model(model_cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    if adapter:
        method = get(config["method"]["name"])
        model = method.load(model, run.adapter, False).eval()
    return model, tokenizer, config
