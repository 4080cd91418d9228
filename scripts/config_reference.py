"""Write the README's config reference from the config dataclasses' field docs.

    python scripts/config_reference.py          # rewrite README.md between the markers
    python scripts/config_reference.py --check  # exit 1 if README.md is out of date (tests run this)
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after each field) of a dataclass and the
    dataclasses it extends."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def default_text(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return ""
    if is_dataclass(value):
        return ""
    return f"`{value!r}`" if value not in ("", None) else ("`null`" if value is None else '`""`')


def table(prefix: str, cls: type) -> list[str]:
    docs = field_docs(cls)
    lines = [f"| `--{prefix}.<field>` | default | meaning |", "| --- | --- | --- |"]
    for f in fields(cls):
        lines.append(f"| `{f.name}` | {default_text(f)} | {docs.get(f.name, '').replace('|', '/')} |")
    return lines


def verb_table(verb: str, function) -> list[str]:
    """A verb's flags from its signature and the Args section of its docstring."""
    from docstring_parser import parse

    docs = {p.arg_name: " ".join((p.description or "").split()) for p in parse(function.__doc__ or "").params}
    lines = [f"| `tunelab {verb}` | default | meaning |", "| --- | --- | --- |"]
    for name, param in inspect.signature(function).parameters.items():
        flag = name if param.default is inspect.Parameter.empty else f"--{name}"
        default = "" if param.default is inspect.Parameter.empty else (
            "`null`" if param.default is None else f"`{param.default!r}`")
        lines.append(f"| `{flag}` | {default} | {docs.get(name, '').replace('|', '/')} |")
    return lines


def render() -> str:
    from tunelab.config import DataConfig, GenerationConfig, MitigateConfig, ModelConfig, TrainConfig
    from tunelab.export import export
    from tunelab.methods import METHODS
    from tunelab.serve import ServerConfig

    sections = [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("mitigate", MitigateConfig),
                ("gen", GenerationConfig)]
    sections += [(f"method.{name}", m.config_cls) for name, m in METHODS.items()]
    sections += [("server", ServerConfig)]
    out = []
    for prefix, cls in sections:
        out += [f"#### `{prefix}`", ""] + table(prefix, cls) + [""]
    for verb, function in [("export", export)]:
        out += [f"#### `tunelab {verb}`", ""] + verb_table(verb, function) + [""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("README.md's config reference is out of date: run python scripts/config_reference.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
