"""The package layout keeps its promises: no import circles, the fast path behind one door.

The import graph is read from the source with `ast` (scripts/import_graph.py), so nothing
is imported to check it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import import_graph  # noqa: E402


def test_no_import_circles():
    assert import_graph.cycles(import_graph.graph()) == []


def test_no_function_local_import_hides_a_circle():
    """Counting the imports inside functions as edges too still gives no circle: a local
    import exists for `tunelab --help`'s speed or an optional dependency, never to break one."""
    assert import_graph.hidden_cycles() == []


def _imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):  # module level and function-local alike
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= set(import_graph._targets(node, name, path.name == "__init__.py", known))
    return found


def test_the_fast_path_has_one_door():
    """Outside `accel/` nothing reaches into its files: train, the learning checks and
    mitigation go through `tunelab.accel` itself (`prepare`, `Levers`, `plain_forward`)."""
    modules = import_graph.modules()
    known = set(modules)
    offenders = {name: sorted(t for t in _imports_of(path, name, known) if t.startswith("tunelab.accel."))
                 for name, path in modules.items() if not name.startswith("tunelab.accel")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_methods_do_not_depend_on_the_fast_path():
    """`methods/` holds methods; the fast path asks them (never the other way round)."""
    modules = import_graph.modules()
    known = set(modules)
    offenders = {name: sorted(t for t in _imports_of(path, name, known) if t.startswith("tunelab.accel"))
                 for name, path in modules.items() if name.startswith("tunelab.methods")}
    assert {k: v for k, v in offenders.items() if v} == {}
