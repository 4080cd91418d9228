"""The run directory: its layout, crash-safe checkpoints, and loading a finished run.

A run directory describes itself (config.yaml, tokenizer, adapter, metrics), so chat,
merge and eval need nothing but its path. Every directory is written under a temporary
name, flushed, marked complete and renamed: a crash leaves either the old state or the
new one, never a directory that looks complete and fails to load. Resuming is guarded:
the base model and the data must be the ones the checkpoints were trained on, and changed
hyperparameters are listed and need `--allow_config_change true`. See docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, ModelConfig, from_dict
from .methods import get

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it; so is `models`, which imports torch at its top.

COMPLETE = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"step-(\d+)")
LEFTOVER_SUFFIXES = (".tmp", ".old", ".trash")
"""Names of directories a crash can leave behind mid-write, mid-rename or mid-delete."""
HARMLESS_CHANGES = {"train.save_every", "train.keep_checkpoints", "train.log_every",
                    "train.tensorboard", "train.max_bad_steps", "train.eval_every",
                    "train.micro_batch_size", "train.micro_batch_tokens", "train.auto_micro_batch",
                    "train.gradient_checkpointing", "model.attn_implementation", "data.path",
                    "model.path", "model.hub", "model.revision", "model.device", "train.distributed"}
"""Config keys that may change on resume without `--allow_config_change`: logging and
checkpoint cadence, where the files are (they are checked by content), and the memory and
kernel knobs a resume on another card may need, which change rounding, not what is learned
(sharded or replicated weights take the same steps: `train.distributed`)."""


class DiskFull(OSError):
    """No space left while writing a checkpoint or adapter; the previous one is intact."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


class ResumeRefused(RuntimeError):
    """The run directory's checkpoints were trained on other inputs or settings."""


class AdapterMismatch(RuntimeError):
    """An adapter does not fit the base model it is being loaded onto."""


class RunLocked(RuntimeError):
    """Another live `tunelab train` process is writing the same run directory."""


class NotWritable(RuntimeError):
    """An output folder cannot be written; checked before the work, not after it."""


LOCK_FILE = ".tunelab.lock"
"""Held (flock) by the process training a run directory; the kernel releases it when that
process ends, however it ends, so a lock left by a killed process is simply taken over."""
EXPORT_MARKER = "tunelab_export.json"
"""Written in every model directory `tunelab merge` exports; only such a directory is replaced
without --overwrite true."""
RUN_ENTRIES = {"config.yaml", "inputs.json", "data_stats.json", "metrics.jsonl", "summary.json", "DONE",
               "adapter", "tokenizer", "checkpoints", "tensorboard", LOCK_FILE}
"""What a run directory holds (exports such as RUN/merged aside)."""


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
    inputs = property(lambda self: self.root / "inputs.json")
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
                 if CHECKPOINT_NAME.fullmatch(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def recover(self) -> None:
        """Finish or undo what a crash interrupted: a rename half done is rolled forward,
        half-written and half-deleted directories and files are removed."""
        leftovers = [p for p in self.root.iterdir()
                     if p.name.split(".")[0] in ("adapter", "checkpoints", "metrics", "data_stats", "summary")]
        if self.checkpoints.is_dir():
            leftovers += list(self.checkpoints.iterdir())
        for suffix in LEFTOVER_SUFFIXES:  # .tmp first: a new complete version beats the old one
            for path in leftovers:
                if not path.name.endswith(suffix) or not path.exists():
                    continue
                final = path.with_name(path.name[:-len(suffix)])
                if path.is_file():
                    path.unlink()
                elif suffix != ".trash" and not final.exists() and (path / COMPLETE).is_file():
                    path.rename(final)  # killed between write_atomically's two renames
                else:
                    delete_tree(path)

    def is_run(self) -> bool:
        """Whether the directory holds a tunelab run (its config.yaml is a run's config)."""
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(config, dict) and {"model", "data", "method", "train"} <= set(config)

    def claim(self) -> "RunLock":
        """Refuse a directory that holds something other than a tunelab run (before anything in
        it is touched), create it, and lock it for this process: a context manager."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file, not a run directory; choose another --out")
        foreign = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() and not self.is_run() else []
        foreign = [name for name in foreign if name != LOCK_FILE and not name.startswith("config.yaml.")]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(
                f"--out {self.root} is not empty and is not a tunelab run (no tunelab config.yaml; it holds "
                f"{shown}): refusing to write a run there, which would replace files such as adapter/ and "
                f"metrics.jsonl. Choose another --out (a new or empty directory, or an earlier run)")
        check_writable(self.root, "--out")
        self.root.mkdir(parents=True, exist_ok=True)
        return RunLock(self.root / LOCK_FILE)

    def start_over(self) -> list[str]:
        """Remove what an earlier attempt left (checkpoints, adapter, metrics); returns what went."""
        gone = []
        for path in (self.checkpoints, self.adapter, self.metrics, self.summary, self.done):
            if path.is_dir():
                remove_tree(path)
                gone.append(path.name + "/")
            elif path.exists():
                path.unlink()
                gone.append(path.name)
        return gone


class RunLock:
    """An exclusive flock on RUN/.tunelab.lock while training; a second process is refused
    while the first lives. The file keeps the holder's pid for the message."""

    def __init__(self, path: Path):
        import fcntl

        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunLocked(f"{path.parent} is being trained by {holder} (it holds {path}); two runs "
                            f"writing one directory would corrupt it. Wait for it to end, stop it, or "
                            f"choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(directory: Path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be written (read-only folder or
    file system): its nearest existing ancestor must accept a new file."""
    import tempfile

    directory = Path(directory).expanduser()
    existing = next((p for p in [directory, *directory.parents] if p.exists()), Path("/"))
    if not existing.is_dir():
        raise NotWritable(f"{flag} {directory}: {existing} is a file, so the folder cannot be created there")
    problem = None if os.access(existing, os.W_OK | os.X_OK) else "permission denied"
    if problem is None:  # a read-only file system passes os.access for root: create a file
        try:
            try:  # an unnamed file (Linux): nothing to delete afterwards
                os.close(os.open(existing, getattr(os, "O_TMPFILE", 0) | os.O_WRONLY, 0o600))
            except OSError as err:
                unsupported = err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
                if hasattr(os, "O_TMPFILE") and not unsupported:
                    raise
                with tempfile.NamedTemporaryFile(dir=existing, prefix=".tunelab-write-check-"):
                    pass
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        raise NotWritable(f"{flag} {directory}: {existing} cannot be written ({problem}); nothing was done. "
                          f"Choose a writable {flag} or fix the folder's permissions")


def check_export_target(out: Path, overwrite: bool, run: Path, base: Path | None) -> None:
    """Refuse an export directory that would destroy what is not an earlier export: the run,
    its base model, or a folder holding either; any other existing directory unless it holds
    tunelab_export.json or --overwrite true is given. Checked before any work."""
    out = Path(out).expanduser().resolve()
    for what, protected in (("the run", run), ("the run's base model", base)):
        if protected is None:
            continue
        protected = Path(protected).expanduser().resolve()
        if out == protected or out in protected.parents:
            raise ConfigError(f"--out {out} is {what} ({protected}) or a folder holding it: an export "
                              f"there would delete it. Choose another --out (default: RUN/merged)")
        inside = protected in out.parents
        if inside and (what != "the run" or out.relative_to(protected).parts[0] in RUN_ENTRIES):
            raise ConfigError(f"--out {out} is inside {what} ({protected}) and would replace part of it. "
                              f"Choose another --out (default: RUN/merged)")
    if not out.exists():
        check_writable(out, "--out")
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the export is a directory. Choose another --out")
    if not (out / EXPORT_MARKER).is_file() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not a tunelab export (no {EXPORT_MARKER}): refusing to "
                          f"replace it, which would delete its files. Choose another --out, or pass "
                          f"--overwrite true to delete it and write the export there")
    check_writable(out.parent, "--out")


def fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, fill) -> Path:
    """Create directory `final` by calling fill(tmp_dir), then flush, mark and rename it.

    The marker is written only after every other file is on disk, and the directory gets its
    final name only after that: a directory named `final` with a COMPLETE marker is always
    whole. If `fill` fails (disk full, a non-finite tensor) the temporary directory is removed
    and whatever was at `final` before is untouched.
    """
    tmp = final.with_name(final.name + ".tmp")
    delete_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        fsync_tree(tmp)
        with open(tmp / COMPLETE, "w") as marker:
            marker.write("ok\n")
            marker.flush()
            os.fsync(marker.fileno())
        fsync_dir(tmp)
    except BaseException as err:
        delete_tree(tmp)
        if is_disk_full(err):
            raise DiskFull(errno.ENOSPC, disk_full_message(final, None if isinstance(err, OSError) else err)) from err
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        delete_tree(old)
        final.rename(old)
    tmp.rename(final)  # a crash between these two renames is rolled forward by RunDir.recover
    delete_tree(old)
    fsync_dir(final.parent)
    return final


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT however it arrives: an OSError, torch.save's RuntimeError from its zip
    writer (`inline_container.cc ... file write failed`, no errno kept) or safetensors'
    error (`... os error 28`, `StorageFull`)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return (isinstance(err, RuntimeError) and ("inline_container.cc" in text or "file write failed" in text)) \
        or "os error 28" in text or "StorageFull" in text or "No space left on device" in text


def disk_full_message(final: Path, unsure: BaseException | None = None) -> str:
    """`unsure`: a write error that names no cause (torch's), reported as what it usually is."""
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**20:,.0f} MiB free now"
    except OSError:
        free = "free space unknown"
    what = "the disk is full: no space left"
    if unsure is not None:
        said = next((line for line in str(unsure).splitlines() if "failed" in line), str(unsure).splitlines()[0])
        what = f"the disk is full or failed ({said.strip()[-120:]}): a write failed"
    return (f"{what} on the device holding {final.parent} ({free}) "
            f"while writing {final.name}. Nothing was replaced: the previous checkpoint and "
            f"adapter are intact. Free some space (fewer --train.keep_checkpoints, older runs) "
            f"or write the run elsewhere with --out, then run the same command again to resume")


def remove_tree(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves it looking complete: it is
    renamed away (atomically) first, then removed."""
    trash = path.with_name(path.name + ".trash")
    delete_tree(trash)
    path.rename(trash)
    delete_tree(trash)


def delete_tree(path: Path) -> None:
    """rmtree that drops the COMPLETE marker first: a directory cut short by a crash while
    being deleted never claims to be complete."""
    if path.is_dir():
        for marker in path.rglob(COMPLETE):
            marker.unlink()
        shutil.rmtree(path, ignore_errors=True)


def assert_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to write non-finite trainable weights."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise FloatingPointError(f"refusing to save {what}: parameter {name} has NaN/Inf values")


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDir, step: int, model, method, optimizer, scheduler, state: dict,
                    keep: int) -> Path:
    """Everything needed to continue exactly: weights, optimizer, schedule, RNG, position."""
    import torch

    assert_finite(model, f"checkpoint step {step}")

    def fill(tmp: Path) -> None:
        method.checkpoint(model, tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    path = write_atomically(run.checkpoints / f"step-{step:07d}", fill)
    for old in run.complete_checkpoints()[:-keep]:
        remove_tree(old)
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    """Our own file, but still loaded without running pickle code: a trainer_state.pt holding
    anything but tensors and plain values is refused, never retried less safely."""
    import pickle

    import torch

    from .models import pickle_reason

    path = checkpoint / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ResumeRefused(
            f"{path} holds objects other than tensors and plain values, and unpickling them could "
            f"run code, so it was not loaded{pickle_reason(err)}. tunelab never writes "
            f"such a file: if you did not put it there, delete the checkpoint {checkpoint} (the "
            f"previous one is used) or start over with --resume false") from None


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_jsonable))


def write_text(path: Path, text: str) -> None:
    """Replace a file in one step: a crash leaves the old contents or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` (what a resumed checkpoint has seen) and drop
    the rest, including a line cut short by a crash; returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
    return dropped


def file_fingerprint(path: str | Path) -> dict:
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> list[str]:
    """`--section.key: old -> new` for each setting that differs between two resolved configs
    and could change what is learned (see HARMLESS_CHANGES). Keys one side lacks (a field
    added by a newer tunelab) and options of methods not selected on either side are ignored."""
    new = yaml.safe_load(yaml.safe_dump(new, allow_unicode=True))  # the types a saved file has
    sections = ("model", "data", "method", "train")
    a = flatten({k: old.get(k) or {} for k in sections})
    b = flatten({k: new.get(k) or {} for k in sections})
    chosen = {a.get("method.name"), b.get("method.name")}
    changes = []
    for key in sorted(set(a) & set(b)):
        parts = key.split(".")
        if key in HARMLESS_CHANGES or (parts[0] == "method" and len(parts) > 2 and parts[1] not in chosen):
            continue
        if a[key] != b[key]:
            changes.append(f"--{key}: {a[key]!r} -> {b[key]!r}")
    return changes


def check_resume(run: RunDir, config: dict, inputs: dict, allow_config_change: bool) -> list[str]:
    """Refuse to continue `run` on another base model or data set, or with other settings
    unless allowed; returns the setting changes (empty: same run)."""
    from .models import fingerprint_changes

    saved = json.loads(run.inputs.read_text()) if run.inputs.is_file() else {}
    problems = []
    if "base_model" in saved:
        problems += [f"base model {config['model']['path']}: {change}"
                     for change in fingerprint_changes(saved["base_model"], inputs["base_model"])]
    if "data" in saved and saved["data"] != inputs["data"]:
        old, new = saved["data"], inputs["data"]
        problems.append(f"data {config['data']['path']}: contents changed ({old['size']:,} -> "
                        f"{new['size']:,} bytes, sha256 {old['sha256'][:12]} -> {new['sha256'][:12]})")
    if problems:
        raise ResumeRefused(
            f"refusing to resume {run.root}: its checkpoints were trained on other inputs.\n  "
            + "\n  ".join(problems[:12])
            + "\nRestore the original files, or train a new run (another --out, or --resume false "
              "to discard this run's checkpoints)")
    changes = config_changes(run.read_config(), config) if run.config.is_file() else []
    if changes and not allow_config_change:
        raise ResumeRefused(
            f"refusing to resume {run.root} with other settings than its checkpoints were trained "
            f"with:\n  " + "\n  ".join(changes)
            + "\nPass --allow_config_change true to continue with the new settings (the run will no "
              "longer match an uninterrupted one), or --resume false to start over")
    return changes


def check_adapter(directory: Path, model: torch.nn.Module) -> None:
    """Refuse, before any of it is loaded, an adapter that is not safetensors, is cut short,
    or whose tensors do not fit the modules of `model` they adapt (another base model)."""
    from .models import safetensors_shapes

    files = check_adapter_files(directory)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    problems = []
    for file in files:
        try:
            shapes = safetensors_shapes(file)
        except (ValueError, OSError) as err:
            raise AdapterMismatch(f"{file} cannot be read: {err}") from None
        for key, shape in shapes.items():
            problem = _misfit(key.removeprefix("base_model.model."), shape, modules)
            if problem:
                problems.append(f"{key} {problem}")
    if problems:
        raise AdapterMismatch(
            f"the adapter in {directory} does not fit this base model "
            f"({type(base).__name__}, {sum(p.numel() for p in base.parameters()):,} parameters); "
            f"was it trained on another one?\n  " + "\n  ".join(problems[:8])
            + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""))


def check_adapter_files(directory: Path) -> list[Path]:
    """The adapter's safetensors files, or an error: missing directory or weights, a pickle
    weight file (it could run code), a file cut short. Reads headers only."""
    from .models import PICKLE_SUFFIXES, safetensors_shapes

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    files = sorted(directory.glob("*.safetensors"))
    if pickles:
        raise AdapterMismatch(f"{directory}: adapters load from safetensors only, and it holds "
                              f"{', '.join(pickles)}: a pickle can run code when loaded, so it is not. "
                              f"Convert it to safetensors where you trust its source")
    if not files:
        raise AdapterMismatch(f"{directory} has no adapter weights: no .safetensors file (the weights "
                              f"file is missing; was the run copied without it?)")
    for file in files:
        try:
            safetensors_shapes(file)
        except (ValueError, OSError) as err:
            raise AdapterMismatch(f"{file} cannot be read: {err}") from None
    return files


def run_model_config(run: RunDir, config: dict, base=None):
    """The run's base ModelConfig from its config.yaml, pointed at `base.path` where given (the
    base was moved); a recorded local path that no longer exists is a clear error."""
    from dataclasses import replace

    from .models import ModelNotFound

    model_cfg = from_dict(ModelConfig, config["model"])
    if base is not None and getattr(base, "path", None):
        return replace(model_cfg, path=base.path)
    recorded = Path(model_cfg.path).expanduser()
    if model_cfg.path.startswith((".", "/", "~")) and not recorded.exists():
        raise ModelNotFound(f"the base model {model_cfg.path} does not exist (that path came from the run's "
                            f"{run.config}, model.path): was it moved? Point the run at it with "
                            f"--model.path NEW_PATH (it must be the same model: it is checked)")
    return model_cfg


def _misfit(key: str, shape: list[int], modules: dict) -> str | None:
    """Why adapter tensor `key` cannot belong to the base module it names (None: it can)."""
    import torch

    parts = key.split(".")
    found = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in modules), default=0)
    if not found:
        return None  # not tied to a base module (a prompt encoder's own tensor)
    name = ".".join(parts[:found])
    module = modules[name]
    children = dict(module.named_children())
    if children and parts[found] not in children:
        return f"targets {name}.{parts[found]}, which this model does not have"
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        fits = (len(shape) == 2 and (shape[1] == module.in_features or shape[0] == module.out_features)) \
            or (len(shape) == 1 and shape[0] == module.out_features)
        if not fits:
            return (f"has shape {shape}, which does not fit {name} ({module.in_features} -> "
                    f"{module.out_features} features)")
    if isinstance(module, torch.nn.Embedding):
        if len(shape) == 2 and not (shape[1] == module.num_embeddings or shape[0] == module.embedding_dim
                                   or tuple(shape) == (module.num_embeddings, module.embedding_dim)):
            return (f"has shape {shape}, which does not fit {name} ({module.num_embeddings} x "
                    f"{module.embedding_dim})")
    return None


def check_base(run: RunDir, model_cfg) -> None:
    """Refuse a base model whose tensor shapes differ from the one `run` was trained on;
    warn if only its contents differ (the same model re-saved in another dtype is fine)."""
    from .models import fingerprint, fingerprint_changes

    if not run.inputs.is_file():
        return  # a run from before tunelab recorded its inputs
    saved = json.loads(run.inputs.read_text()).get("base_model")
    if not saved:
        return
    current = fingerprint(model_cfg)
    changes = fingerprint_changes(saved, current)
    if not changes:
        return
    if saved.get("shapes_sha256") != current.get("shapes_sha256"):
        raise AdapterMismatch(f"{run.root} was trained on another base model than "
                              f"{model_cfg.path} holds now:\n  " + "\n  ".join(changes[:12]))
    warnings.warn(f"the base model at {model_cfg.path} changed since {run.root} was trained "
                  f"(same tensor shapes): " + "; ".join(changes[:4]), stacklevel=2)


def load_run(path: str | Path, device: torch.device | None = None, adapter: bool = True, base=None):
    """(model, tokenizer, run config) of a finished run: its base with its adapter applied.
    `base`: a ModelConfig whose path replaces the recorded one (the base was moved)."""
    from transformers import AutoTokenizer

    from .models import load_model

    run = RunDir(Path(path))
    config = run.read_config()
    if not run.adapter.is_dir():
        raise FileNotFoundError(f"{run.root} has no adapter/ yet: the run has not finished "
                                f"(resume it with `tunelab train --config {run.config}`)")
    model_cfg = run_model_config(run, config, base)
    if adapter:
        check_base(run, model_cfg)  # before any weight is read
    model = load_model(model_cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    if adapter:
        check_adapter(run.adapter, model)
        method = get(config["method"]["name"])
        model = method.load(model, run.adapter, False).eval()
    return model, tokenizer, config
