"""Measure the package layout: import circles, function-local imports, long functions.

    python scripts/import_graph.py            # summary: lines per package, circles, local imports
    python scripts/import_graph.py --locals   # also list every function-local import

The graph has one edge per module-level `import`/`from ... import` between tunelab modules
(imports inside functions are not edges: they run late, which is how a circle hides).
`tests/test_layout.py` asserts the graph has no circles, so one cannot come back unnoticed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tunelab"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, name: str, is_package: bool, known: set[str]) -> list[str]:
    """The tunelab modules one import statement loads."""
    found = []
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(node, name, is_package)
        found = [base]
        # `from tunelab.accel import loss` imports the submodule `tunelab.accel.loss`.
        found += [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    out = []
    for target in found:
        if not target.startswith(PACKAGE):
            continue
        # Importing a.b.c runs a/__init__ and a/b/__init__ too.
        parts = target.split(".")
        out += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known]
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(tree: ast.Module):
    """Import statements that run when the module is imported (not inside def/class bodies)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                stack += handler.body
        elif isinstance(node, ast.With):
            stack += node.body


def _function_local(tree: ast.Module):
    """(function name, line, import node) for every import inside a def."""
    def walk(node, owner):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and owner is not None:
                yield owner, child.lineno, child
            else:
                yield from walk(child, owner)
    yield from walk(tree, None)


def graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    known = set(mods)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree):
            for target in _targets(node, name, is_package, known):
                if target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def hidden_cycles(src: Path = SRC) -> list[list[str]]:
    """Circles that appear once function-local imports count as edges too."""
    mods = modules(src)
    known = set(mods)
    edges = graph(src)
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for _, _, node in _function_local(tree):
            for target in _targets(node, name, is_package, known):
                if target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return cycles(edges)


def local_imports(src: Path = SRC) -> list[tuple[str, str, int, str]]:
    out = []
    for name, path in modules(src).items():
        tree = ast.parse(path.read_text(), str(path))
        for owner, line, node in _function_local(tree):
            out.append((name, owner, line, ast.unparse(node)))
    return out


def longest_functions(src: Path = SRC, top: int = 5) -> list[tuple[int, str]]:
    found = []
    for name, path in modules(src).items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(found, reverse=True)[:top]


def lines_per_package(src: Path = SRC) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, path in modules(src).items():
        rel = path.relative_to(src / PACKAGE)
        package = "/".join(rel.parts[:-1]) or "(top level)"
        totals[package][0] += 1
        totals[package][1] += len(path.read_text().splitlines())
    return {k: (v[0], v[1]) for k, v in sorted(totals.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locals", action="store_true", help="list every function-local import")
    args = parser.parse_args()
    print("package          files  lines")
    for package, (files, lines) in lines_per_package().items():
        print(f"  {package:<14} {files:>5} {lines:>6}")
    found = cycles(graph())
    print(f"import circles (module level): {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    hidden = hidden_cycles()
    print(f"import circles once function-local imports count: {len(hidden)}")
    for component in hidden:
        print("  " + " <-> ".join(component))
    local = local_imports()
    internal = [entry for entry in local if entry[3].startswith("from .") or PACKAGE in entry[3].split()[1]]
    print(f"function-local imports: {len(local)} ({len(internal)} of tunelab modules, "
          f"{len(local) - len(internal)} of torch, optional or third-party packages)")
    if args.locals:
        for module, owner, line, text in local:
            print(f"  {module}:{line} {owner}(): {text}")
    print("longest functions:")
    for length, name in longest_functions():
        print(f"  {length:>4} {name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
