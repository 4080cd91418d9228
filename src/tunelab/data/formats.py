"""Rows -> messages: read alpaca, `messages` and sharegpt rows from .json / .jsonl files.

Every valid row becomes an `Example`: role/content messages (an optional system message,
then user/assistant turns starting with user and ending with an assistant reply) and the
place the row came from. The whole file is validated before any model is loaded, and every
bad record is reported as `path:N: reason`, where N is the 1-based line of a .jsonl file or
the 0-based index into the top-level list of a .json file.

Formats, detected per row by its keys:
- alpaca: `instruction`, optional `input`, `output`, optional `history` (a list of
  [user, assistant] pairs: earlier turns, placed before the instruction). The user turn is
  `instruction + input` joined with no separator, exactly as the reference recipe does, so
  a model trained there and here has seen the same prompts.
- messages: `messages: [{role, content}]`, role system (first only), user or assistant.
- sharegpt: `conversations: [{from, value}]`, from human|user, gpt|assistant or system.
Any row may carry a `system` string; it, or a leading system message, wins over the
config's `system_prompt`. An empty system prompt counts as none, and JSON null in an
optional field counts as absent.
"""

from __future__ import annotations

import codecs
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from tunelab.config import check

MAX_LISTED = 50
"""Bad records printed in a DataError message; the rest are counted, all are in `.bad`."""

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class DataError(ValueError):
    """The data file cannot be used; the message says where and why, `.bad` lists every record."""

    def __init__(self, message: str, bad: Optional[list[BadRecord]] = None) -> None:
        super().__init__(message)
        self.bad = bad or []


@dataclass
class BadRecord:
    source: str
    """`path:line` (.jsonl, 1-based) or `path:index` (.json, 0-based)."""
    reason: str
    """What is wrong, naming the field."""
    kind: str = ""
    """Short category (`missing field`, `empty response`, ...): the key of `skipped_by_reason`."""

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class Example:
    messages: list[dict]
    """Normalized `{"role", "content"}` dicts; the system prompt, if any, is already in."""
    source: str
    """`path:line` (.jsonl, 1-based) or `path:index` (.json, 0-based)."""


@dataclass
class LoadResult:
    examples: list[Example]
    n_read: int
    """Records read (non-blank lines of a .jsonl, items of a .json), bad ones included."""
    bad: list[BadRecord] = field(default_factory=list)
    """Records dropped under `on_error="skip"` (under "stop" they raise instead)."""
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    """Examples whose normalized messages repeat an earlier example's (counted, kept)."""

    def summary(self) -> str:
        text = f"{len(self.examples)} examples from {self.n_read} rows"
        if self.bad:
            reasons = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped_by_reason.items()))
            text += f"; skipped {len(self.bad)} bad ({reasons})"
        if self.duplicates:
            text += f"; {self.duplicates} exact duplicates"
        return text


class _Bad(Exception):
    """One record is bad; caught per record so that every bad record gets reported."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def load_examples(path: Union[str, Path], system_prompt: Optional[str] = None,
                  on_error: Literal["stop", "skip"] = "stop",
                  limit: Optional[int] = None) -> LoadResult:
    """Read a data file into Examples, validating every row.

    Args:
        path: a .json file (a top-level list of rows) or a .jsonl file (one row per line).
        system_prompt: system message for rows that have none of their own.
        on_error: `stop` raises DataError listing every bad record as `path:N: reason`;
            `skip` drops them and counts them per reason in `skipped_by_reason`.
        limit: keep only the first N valid rows. The whole file is still validated, so a
            quick run fails on the same bad records that the full run would.
    """
    check(on_error in ("stop", "skip"), "data.on_error", "stop or skip", on_error)
    check(limit is None or limit > 0, "data.limit", "> 0 or null", limit)
    name, path = str(path), Path(path)
    if not path.is_file():
        raise DataError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
    records = _read_records(path, name)
    examples: list[Example] = []
    bad: list[BadRecord] = []
    for source, row in records:
        try:
            if isinstance(row, _Bad):
                raise row
            messages = _parse_row(row)
        except _Bad as error:
            bad.append(BadRecord(source, error.reason, error.kind))
            continue
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        examples.append(Example(messages, source))

    skipped = dict(Counter(record.kind for record in bad))
    if bad and on_error == "stop":
        listed = "\n".join(f"  {record}" for record in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{name}: {len(bad)} bad record(s); fix them, or pass "
                        f"`--data.on_error skip` to drop them:\n{listed}{more}", bad)
    if not examples:
        raise DataError(f"{name}: no valid rows ({len(records)} read, all bad: {skipped})", bad)
    examples = examples[:limit] if limit else examples
    seen = Counter(_dedup_key(example) for example in examples)
    return LoadResult(examples, len(records), bad, skipped, sum(n - 1 for n in seen.values()))


def split(examples: list[Example], val_size: float,
          seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random validation set; both parts keep file order.

    Args:
        examples: rows to split.
        val_size: a fraction (< 1; at least one row when > 0) or a row count (>= 1);
            0 means no validation set.
        seed: the same seed and rows always give the same split.

    Exact duplicates are not grouped, so copies of a row can land on both sides.
    """
    n = len(examples)
    check(val_size >= 0, "data.val_size", ">= 0 (a fraction or a row count)", val_size)
    if val_size == 0:
        return list(examples), []
    if val_size < 1:
        n_val = max(1, round(n * val_size))
    else:
        check(float(val_size).is_integer(), "data.val_size",
              "a fraction < 1 or a whole row count", val_size)
        n_val = int(val_size)
    check(n_val < n, "data.val_size",
          f"small enough to leave training rows ({n} rows, {n_val} held out)", val_size)
    held_out = set(random.Random(seed).sample(range(n), n_val))
    return ([example for i, example in enumerate(examples) if i not in held_out],
            [example for i, example in enumerate(examples) if i in held_out])


def _read_records(path: Path, name: str) -> list[tuple[str, Any]]:
    """(source, row) per record; a record that is not even JSON comes as a `_Bad` row."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{name}: the file is UTF-16; save it as UTF-8")
    raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows add one; it is harmless
    if not raw.strip():
        raise DataError(f"{name}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(raw, name)
    if suffix != ".json":
        raise DataError(f"{name}: expected a .json or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{name}: not valid UTF-8 at line {line} (byte 0x{raw[error.start]:02x}); "
                        f"save the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; one row per line? name the file .jsonl" if error.msg == "Extra data" else ""
        raise DataError(f"{name}: invalid JSON at line {error.lineno} column {error.colno}: "
                        f"{error.msg}{hint}") from None
    if not isinstance(rows, list):
        raise DataError(f"{name}: a .json file must hold a list of rows, got {_json_type(rows)}")
    if not rows:
        raise DataError(f"{name}: the list of rows is empty")
    return [(f"{name}:{index}", row) for index, row in enumerate(rows)]


def _read_jsonl(raw: bytes, name: str) -> list[tuple[str, Any]]:
    records: list[tuple[str, Any]] = []
    # Splitting bytes is safe: 0x0A never occurs inside a multi-byte UTF-8 character, and
    # decoding line by line finds every bad line, not only the first.
    for number, line in enumerate(raw.split(b"\n"), 1):
        source = f"{name}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            records.append((source, _Bad("not valid UTF-8", f"not valid UTF-8 (byte 0x"
                            f"{line[error.start]:02x} at byte {error.start + 1} of the line); "
                            f"save the file as UTF-8")))
            continue
        if not text.strip():
            continue
        try:
            records.append((source, json.loads(text)))
        except json.JSONDecodeError as error:
            records.append((source, _Bad("invalid JSON",
                                         f"invalid JSON at column {error.colno}: {error.msg}")))
    return records


def _parse_row(row: Any) -> list[dict]:
    """One row -> normalized messages, or `_Bad` naming what is wrong."""
    if not isinstance(row, dict):
        raise _Bad("not an object", f"a row must be a JSON object, got {_json_type(row)}")
    if "messages" in row:
        messages = _chat_turns(row, "messages", "role", "content", CHAT_ROLES)
    elif "conversations" in row:
        messages = _chat_turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in row or "output" in row:
        messages = _alpaca_turns(row)
    else:
        raise _Bad("missing field", "missing field: a row needs `instruction` and `output` "
                   f"(alpaca), `messages` or `conversations`; got keys {sorted(row)}")
    if messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages.pop(0)  # an empty system message means "none", so the config's applies
    system = _optional_str(row, "system")
    if system.strip():
        if messages[0]["role"] == "system":
            raise _Bad("two system prompts", "both a `system` field and a system message")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _alpaca_turns(row: dict) -> list[dict]:
    instruction = _required_str(row, "instruction")
    output = _required_str(row, "output")
    user = instruction + _optional_str(row, "input")  # no separator: the reference's prompts
    if not output.strip():
        raise _Bad("empty response", "`output` is empty")
    history = [] if row.get("history") is None else row["history"]
    if not isinstance(history, list):
        raise _Bad("bad history", "`history` must be a list of [user, assistant] pairs, "
                   f"got {_json_type(history)}")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(turn, str) for turn in pair)):
            raise _Bad("bad history", f"`history[{i}]` must be a [user, assistant] pair of "
                       f"strings, got {json.dumps(pair, ensure_ascii=False)[:60]}")
        if not pair[1].strip():
            raise _Bad("empty response", f"`history[{i}]` has an empty assistant reply")
        messages += [{"role": "user", "content": pair[0]},
                     {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _chat_turns(row: dict, key: str, role_key: str, content_key: str,
                roles: dict[str, str]) -> list[dict]:
    turns = row[key]
    if not isinstance(turns, list):
        raise _Bad("not a list", f"`{key}` must be a list, got {_json_type(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _Bad("not an object", f"`{where}` must be an object, got {_json_type(turn)}")
        role = _required_str(turn, role_key, where)
        if role not in roles:
            raise _Bad("unknown role", f"`{where}.{role_key}` is {role!r}; "
                       f"accepted: {', '.join(roles)}")
        content = _required_str(turn, content_key, where)
        if roles[role] == "assistant" and not content.strip():
            raise _Bad("empty response", f"`{where}.{content_key}` is an empty assistant reply")
        messages.append({"role": roles[role], "content": content})

    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise _Bad("roles out of order", f"`{key}[{i}]` is {messages[i]['role']}, expected "
                       f"{expected} (optional system, then user and assistant alternating)")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise _Bad("roles out of order", f"`{key}` must end with an assistant reply")
    return messages


def _required_str(obj: dict, name: str, where: str = "") -> str:
    label = f"{where}.{name}" if where else name
    if name not in obj:
        raise _Bad("missing field", f"missing field `{label}`")
    if not isinstance(obj[name], str):
        raise _Bad("not a string", f"`{label}` must be a string, got {_json_type(obj[name])}")
    return obj[name]


def _optional_str(obj: dict, name: str) -> str:
    if obj.get(name) is None:
        return ""
    if not isinstance(obj[name], str):
        raise _Bad("not a string", f"`{name}` must be a string, got {_json_type(obj[name])}")
    return obj[name]


def _json_type(value: Any) -> str:
    """The JSON name of a value's type: users wrote JSON, not Python."""
    names = {bool: "boolean", str: "string", int: "number", float: "number", list: "list",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _dedup_key(example: Example) -> tuple:
    return tuple((message["role"], message["content"]) for message in example.messages)


__all__ = ["DataError", "BadRecord", "Example", "LoadResult", "load_examples", "split"]
