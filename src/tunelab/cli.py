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
        print(f"{name:10} {method.summary}")
        print(f"{'':10} mergeable={caps.mergeable} packing={caps.supports_packing} needs_gpu={caps.needs_gpu}")
        print(f"{'':10} defaults: {asdict(method.config_cls())}")


def verbs() -> dict:
    from .chat import chat
    from .data.inspect import inspect_data
    from .train import train

    return {"train": train, "chat": chat, "methods": methods, "data": {"inspect": inspect_data}}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    from .config import ConfigError
    from .data import DataError, TemplateError
    from .models import ModelNotFound, UnsafeWeights
    from .train import Interrupted, TrainingDiverged

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        CLI(verbs(), args=argv, as_positional=False)
    except (ConfigError, DataError, TemplateError, ModelNotFound, UnsafeWeights, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
