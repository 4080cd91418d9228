"""Load a model and its tokenizer from a local directory, a `.gguf` file or a hub id.

dtype and device are decided here and nowhere else. Weights load from safetensors;
pickle files are refused unless `--model.allow_pickle` is set (and then load with
`weights_only=True`). No hub is needed for local paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .pull import PullError, load_catalog, pull

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".gguf") + PICKLE_SUFFIXES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path"}
SAMPLE_BLOCK = 64 * 1024


class ModelNotFound(RuntimeError):
    """The model could not be found or fetched; the message says how to give a local path."""


class UnsafeWeights(RuntimeError):
    """Only pickle weight files were found and `--model.allow_pickle` is off."""


def resolve_device(name: str = "auto") -> torch.device:
    """The device `--model.device` names; a CUDA or MPS device this machine lacks is a
    ConfigError saying what it has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"`--model.device {name}`: this machine has no CUDA device (torch "
                              f"{torch.__version__} sees none); use --model.device cpu (or auto)")
        if (device.index or 0) >= count:
            raise ConfigError(f"`--model.device {name}`: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"`--model.device {name}`: MPS is not available here; use --model.device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a CUDA card that supports it, else fp32 (CPU bf16 matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def locate(cfg: ModelConfig) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) holding the model named by `cfg.path`."""
    if not cfg.path:
        raise ModelNotFound("no model given: pass --model.path (a local directory, a .gguf "
                            "file or a hub id)")
    path = Path(cfg.path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        return path.parent, path.name
    if path.is_dir():
        check_model_dir(path)
        return path, None
    if "/" not in cfg.path and not path.exists():
        if cfg.path in load_catalog():  # a catalog name: fetched once into the cache
            try:
                return pull(cfg.path, hub=cfg.hub), None
            except PullError as err:
                raise ModelNotFound(str(err)) from None
    if path.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise ModelNotFound(f"{cfg.path!r} is neither a model directory, a .gguf file nor a "
                            f"hub id (owner/name)")
    return _download(cfg), None


def _download(cfg: ModelConfig) -> Path:
    hint = (f"could not fetch {cfg.path!r} from the {cfg.hub} hub. If you have the model on disk, "
            f"pass its directory: --model.path /path/to/model (or `tunelab pull` it where a hub "
            f"is reachable)")
    allow = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
    if cfg.allow_pickle:
        allow += ["*.bin"]
    if cfg.hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise ModelNotFound(f"{cfg.path!r} is a ModelScope id but modelscope is not installed: "
                                f"pip install 'tunelab[modelscope]'") from None
        try:
            return Path(snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=allow))
        except Exception as err:  # modelscope raises plain Exceptions for network errors
            raise ModelNotFound(f"{hint}\n  cause: {type(err).__name__}: {err}") from None
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=allow))
    except Exception as err:  # offline, not found, gated: all end the same way for the user
        raise ModelNotFound(f"{hint}\n  cause: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def check_model_dir(directory: Path) -> None:
    """A local model directory must look like one before transformers is asked to load it
    (an empty one otherwise fails with "need sentencepiece or tiktoken")."""
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        raise ModelNotFound(f"the model directory {directory} is empty: --model.path must be a Hugging "
                            f"Face model directory (config.json, *.safetensors, tokenizer files) or a .gguf file")
    if "config.json" not in entries:
        ggufs = [e for e in entries if e.endswith(".gguf")]
        hint = (f"; for a GGUF model pass the file itself: --model.path {directory / ggufs[0]}" if ggufs
                else ": is it the right folder, or was the download cut short?")
        raise ModelNotFound(f"{directory} has no config.json, so it is not a Hugging Face model directory "
                            f"(it holds {', '.join(entries[:6])}{' ...' if len(entries) > 6 else ''}){hint}")


def check_weight_files(directory: Path) -> None:
    """Every safetensors file must be whole (its header read, its size checked), so a file cut
    short by a download or a copy is named instead of failing deep inside the loader."""
    for file in sorted(directory.glob("*.safetensors")):
        try:
            safetensors_shapes(file)
        except (ValueError, OSError, UnicodeDecodeError) as err:
            raise ModelNotFound(f"{file} cannot be read ({err}); the file is damaged or incomplete: "
                                f"download or copy the model again") from None


def check_remote_code(directory: Path, trust: bool) -> None:
    """A model whose config.json maps to code shipped with the checkpoint (`auto_map`) and whose
    architecture transformers does not know needs --model.trust_remote_code true."""
    if trust or not (directory / "config.json").is_file():
        return
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{directory / 'config.json'} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "auto_map" not in config:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ConfigError(f"{directory} needs code shipped with the checkpoint (config.json `auto_map` "
                          f"{sorted(config['auto_map'])}; model_type {config.get('model_type')!r} is not "
                          f"built into transformers). Running it executes that code: read it first, then pass "
                          f"--model.trust_remote_code true if you trust its author")


def pickle_reason(err: BaseException) -> str:
    """What torch's weights-only unpickler found (` (builtins.exec)`), without the rest of its
    message, which explains how to load the file unsafely."""
    for line in str(err).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            found = line.strip().removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
            return f" ({found.split('. ')[0][:120]})"
    return ""


def check_weights_safe(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle files, unless allowed."""
    files = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    if any(f.endswith(".safetensors") for f in files) or any(f.endswith(".gguf") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        raise ModelNotFound(f"{directory} holds no weights (no *.safetensors, *.gguf or pickle file): "
                            f"was the download or copy cut short?")
    if pickles and not allow_pickle:
        raise UnsafeWeights(
            f"{directory} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); loading "
            f"a pickle can run arbitrary code. Convert them to safetensors, or pass "
            f"--model.allow_pickle true if you trust their source (they then load with "
            f"weights_only=True)")


def fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the base model, cheaply: its config.json, each weight and tokenizer
    file's size and hash (weights over 8 MiB: the header plus 16 blocks spread over the file,
    which any change of the numbers touches), and the tensor names and shapes.

    Moving or renaming the model directory does not change it; other weights, another
    architecture or another tokenizer / chat template do.
    """
    directory, gguf = locate(cfg)
    names = [gguf] if gguf else sorted(p.name for p in directory.iterdir()
                                       if p.name.endswith(WEIGHT_SUFFIXES) or p.name in TOKENIZER_FILES)
    config = {}
    if not gguf and (directory / "config.json").is_file():
        config = {k: v for k, v in json.loads((directory / "config.json").read_text()).items()
                  if k not in VOLATILE_CONFIG_KEYS}
    if not gguf:
        check_weight_files(directory)
    shapes: dict = {}
    for name in names:
        if name.endswith(".safetensors"):
            shapes.update(safetensors_shapes(directory / name))
    return {"config": config,
            "files": {name: {"size": (directory / name).stat().st_size, "sha256": sampled_sha256(directory / name)}
                      for name in names},
            "shapes_sha256": hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
            if shapes else None}


def sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 8 * 2**20:
            digest.update(f.read())
        else:
            digest.update(f.read(2**20))  # a safetensors / GGUF header and the first tensors
            for i in range(1, 17):
                f.seek(min(size - SAMPLE_BLOCK, i * size // 17))
                digest.update(f.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (read without loading any tensor)."""
    with open(path, "rb") as f:
        size = path.stat().st_size
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if length + 8 > size:
            raise ValueError(f"{path} is not a whole safetensors file (header of {length} bytes, file of {size})")
        header = json.loads(f.read(length))
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and 8 + length + max(ends) > size:
        raise ValueError(f"{path} is truncated: its tensors need {8 + length + max(ends)} bytes, "
                         f"the file has {size}")
    return {key: info["shape"] for key, info in header.items() if key != "__metadata__"}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two `fingerprint`s (empty: the same model)."""
    changes = []
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"config.json `{key}`: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            changes.append(f"{name}: missing now")
        elif name not in old_files:
            changes.append(f"{name}: new file")
        elif old_files[name] != new_files[name]:
            a, b = old_files[name], new_files[name]
            changes.append(f"{name}: contents differ ({a['size']:,} -> {b['size']:,} bytes, "
                           f"sha256 {a['sha256'][:12]} -> {b['sha256'][:12]})")
    if old.get("shapes_sha256") != new.get("shapes_sha256"):
        changes.append("tensor names or shapes differ")
    return changes


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    directory, gguf = locate(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not gguf:
        check_remote_code(directory, cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{directory}: {str(err).splitlines()[0]} (--model.trust_remote_code true)") from None
        raise ModelNotFound(f"no tokenizer could be loaded from {directory} ({str(err).splitlines()[0][:300]}); "
                            f"a model directory needs tokenizer.json or the tokenizer files its "
                            f"tokenizer_config.json names") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out by position, so any id works; eos is always in the vocab.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device | None = None):
    """The model of `cfg` on `device` in the configured dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    directory, gguf = locate(cfg)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
        try:  # newer transformers keep GGUF blocks unless told to dequantize; older always do
            from transformers import GgufConfig

            # A dequantized GGUF is a plain dense model that can be trained, merged and saved.
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
    else:
        check_remote_code(directory, cfg.trust_remote_code)
        check_weights_safe(directory, cfg.allow_pickle)
        check_weight_files(directory)
        kwargs["use_safetensors"] = None if cfg.allow_pickle else True
        kwargs["weights_only"] = True  # pickles, where allowed, never run code
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"{directory}: {str(err).splitlines()[0]} (--model.trust_remote_code true)") from None
    except pickle.UnpicklingError as err:
        raise UnsafeWeights(
            f"{directory}: a pickle weight file holds objects other than tensors, and unpickling "
            f"them could run code; tunelab loads pickles with weights_only=True only. Convert the "
            f"weights to safetensors where you trust the file{pickle_reason(err)}") from None
    return model.to(device).eval()
