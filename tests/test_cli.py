"""The command line starts fast: `--help` and every flag check answer before torch,
transformers or peft are imported, and the stand-ins that make that possible (verbs.py)
match the functions they stand for."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")

PROBE = """
import json, sys, time
started = time.perf_counter()
from tunelab.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli(*argv: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["merge", "--help"], ["chat", "--help"],
                                  ["eval", "--help"], ["experiment", "--help"], ["data", "inspect", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_imports_no_heavy_module(argv):
    result, _ = run_cli(*argv)
    assert result["code"] == 0 and result["heavy"] == [], result


@pytest.mark.parametrize("argv, flag", [
    (["train", "--train.log_every", "0"], "--train.log_every"),
    (["train", "--method.name", "lorax"], "--method.name"),
    (["train", "--train.log_every", "often"], "train.log_every"),
    (["merge", "run", "--dtype", "fp8"], "dtype"),
], ids=["range", "method", "type", "choice"])
def test_a_bad_flag_is_one_line_before_any_heavy_import(argv, flag):
    result, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert result["code"] == 2 and result["heavy"] == [], (result, err)
    assert lines[0].startswith("error:") and flag in lines[0] and len(lines) <= 2, err


@pytest.mark.parametrize("verb", ["train", "merge", "export"])
def test_stand_ins_match_the_real_functions(verb):
    import importlib

    from tunelab import verbs

    stand_in, real = getattr(verbs, verb), getattr(importlib.import_module(f"tunelab.{verb}"), verb)
    assert inspect.signature(stand_in) == inspect.signature(real)
    assert inspect.getdoc(stand_in) == inspect.getdoc(real)


def test_an_unexpected_error_keeps_its_traceback():
    from tunelab.cli import exit_code
    from tunelab.config import ConfigError
    from tunelab.runs import DiskFull

    assert exit_code(ConfigError("x")) == 2 and exit_code(DiskFull(28, "full")) == 1
    assert exit_code(KeyError("a bug")) is None and exit_code(ValueError("a bug")) is None
