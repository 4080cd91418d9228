"""Rows -> messages: every format in .json and .jsonl, validation of every bad kind, split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.config import ConfigError
from tunelab.data.formats import DataError, Example, load_examples, split

ALPACA = {"instruction": "你是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                              {"from": "user", "value": "Again"},
                              {"from": "assistant", "value": "Hello again!"}]}


def write_rows(path: Path, rows: list) -> Path:
    """Write rows as a .json list or .jsonl lines, chosen by the suffix, in UTF-8."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    return path


def write_bad_fixture(directory: Path) -> tuple[Path, list[tuple[int, str, str]]]:
    """A .jsonl file with good rows and at least one record of every bad kind.

    Returns the path and, per bad record, (line, kind, a fragment of the reason).
    """
    ok = json.dumps(ALPACA, ensure_ascii=False).encode()
    user, assistant = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    lines: list[tuple[bytes, tuple[str, str] | None]] = [
        (ok, None),
        (b'{"instruction": "q", "output": ', ("invalid JSON", "invalid JSON")),
        (b'["q", "a"]', ("not an object", "got list")),
        (b'{"instruction": "q"}', ("missing field", "`output`")),
        (b'{"instruction": "q", "output": 3}', ("not a string", "`output` must be a string")),
        (b'{"instruction": "q", "output": "  "}', ("empty response", "`output` is empty")),
        (b"", None),  # blank lines are skipped, but still counted as lines
        (json.dumps({"messages": [user, user, assistant]}).encode(),
         ("roles out of order", "`messages[1]` is user, expected assistant")),
        (json.dumps({"messages": [user, {"role": "system", "content": "s"}, assistant]}).encode(),
         ("roles out of order", "`messages[1]` is system")),
        (json.dumps({"messages": [user]}).encode(), ("roles out of order", "must end with")),
        (json.dumps({"conversations": [{"from": "human", "value": "q"},
                                       {"from": "bot", "value": "a"}]}).encode(),
         ("unknown role", "`conversations[1].from` is 'bot'")),
        (json.dumps({"instruction": "q", "output": "a", "history": ["q", "a"]}).encode(),
         ("bad history", "`history[0]`")),
        (json.dumps({"instruction": "q", "output": "a", "history": "q a"}).encode(),
         ("bad history", "`history` must be a list")),
        ('{"instruction": "甄嬛", "output": "'.encode() + b"\xff\xfe" + b'"}',
         ("not valid UTF-8", "byte 0xff")),
        (json.dumps({"messages": [user, {"role": "assistant", "content": ""}]}).encode(),
         ("empty response", "`messages[1].content`")),
        (json.dumps({"messages": [user, {"role": "assistant"}]}).encode(),
         ("missing field", "`messages[1].content`")),
        (json.dumps({"messages": "q a"}).encode(), ("not a list", "`messages` must be a list")),
        (json.dumps({"prompt": "q", "completion": "a"}).encode(), ("missing field", "`instruction`")),
        (json.dumps({"system": "s", "messages": [{"role": "system", "content": "t"}, user,
                                                 assistant]}).encode(),
         ("two system prompts", "both a `system` field")),
        (json.dumps(SHAREGPT).encode(), None),
        (json.dumps(MESSAGES).encode(), None),
    ]
    path = directory / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines))  # no newline at the end
    expected = [(number, *bad) for number, (_, bad) in enumerate(lines, 1) if bad]
    return path, expected


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca(tmp_path, suffix):
    rows = [ALPACA, {"instruction": "Translate: ", "input": "你好", "output": "Hello",
                     "system": "You translate."}]
    result = load_examples(write_rows(tmp_path / f"d{suffix}", rows))
    first, second = result.examples
    assert first.messages == [{"role": "user", "content": ALPACA["instruction"]},
                              {"role": "assistant", "content": ALPACA["output"]}]
    # instruction + input are joined with no separator, exactly as the reference does
    assert second.messages == [{"role": "system", "content": "You translate."},
                               {"role": "user", "content": "Translate: 你好"},
                               {"role": "assistant", "content": "Hello"}]
    base = 0 if suffix == ".json" else 1  # .json: 0-based index; .jsonl: 1-based line
    assert [e.source for e in result.examples] == [f"{tmp_path / f'd{suffix}'}:{base + i}"
                                                   for i in range(2)]
    assert (result.n_read, result.bad, result.skipped_by_reason, result.duplicates) == (2, [], {}, 0)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_messages_and_sharegpt(tmp_path, suffix):
    system_first = {"messages": [{"role": "system", "content": "Be brief."}] + MESSAGES["messages"]}
    result = load_examples(write_rows(tmp_path / f"d{suffix}", [MESSAGES, SHAREGPT, system_first]))
    assert [e.messages for e in result.examples] == [
        MESSAGES["messages"],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again!"}],
        system_first["messages"],
    ]


def test_chinese_round_trips_and_bom_is_fine(tmp_path):
    text = "臣妾做不到啊！——「甄嬛」😀"
    row = {"instruction": text, "input": "", "output": text}
    path = tmp_path / "zh.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    (example,) = load_examples(path).examples
    assert [m["content"] for m in example.messages] == [text, text]
    escaped = tmp_path / "escaped.json"  # \uXXXX escapes decode the same
    escaped.write_text(json.dumps([row]), encoding="utf-8")
    assert load_examples(escaped).examples[0].messages == example.messages


def test_system_prompt_from_config_unless_row_has_one(tmp_path):
    rows = [
        ALPACA,
        {**ALPACA, "system": "row system"},
        {**ALPACA, "system": ""},  # empty counts as none
        {"messages": [{"role": "system", "content": "message system"}] + MESSAGES["messages"]},
        {"messages": [{"role": "system", "content": " "}] + MESSAGES["messages"]},
        {"conversations": [{"from": "system", "value": "sharegpt system"}] + SHAREGPT["conversations"]},
        {**SHAREGPT, "system": "field system"},
    ]
    path = write_rows(tmp_path / "d.jsonl", rows)
    systems = [e.messages[0]["content"] for e in load_examples(path, system_prompt="config").examples]
    assert systems == ["config", "row system", "config", "message system", "config",
                       "sharegpt system", "field system"]
    no_default = load_examples(path).examples
    assert [e.messages[0]["role"] for e in no_default] == ["user", "system", "user", "system",
                                                           "user", "system", "system"]


def test_history_expands_before_the_instruction(tmp_path):
    row = {"instruction": "第三问", "input": "？", "output": "三", "system": "s",
           "history": [["第一问", "一"], ["第二问", "二"]]}
    (example,) = load_examples(write_rows(tmp_path / "h.json", [row])).examples
    assert example.messages == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "第一问"}, {"role": "assistant", "content": "一"},
        {"role": "user", "content": "第二问"}, {"role": "assistant", "content": "二"},
        {"role": "user", "content": "第三问？"}, {"role": "assistant", "content": "三"},
    ]
    nulls = {"instruction": "q", "input": None, "output": "a", "history": None, "system": None}
    assert load_examples(write_rows(tmp_path / "n.json", [nulls])).examples[0].messages == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_bad_fixture_stop_lists_every_record(tmp_path):
    path, expected = write_bad_fixture(tmp_path)
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert [b.source for b in caught.value.bad] == [f"{path}:{line}" for line, _, _ in expected]
    assert [b.source for b in caught.value.bad] == [f"{path}:{line}" for line in
                                                    (2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)]
    for bad, (_, kind, fragment) in zip(caught.value.bad, expected):
        assert (bad.kind, fragment in bad.reason) == (kind, True), bad
    message_lines = str(caught.value).splitlines()
    assert message_lines[1:] == [f"  {b.source}: {b.reason}" for b in caught.value.bad]
    assert "--data.on_error skip" in message_lines[0]


def test_bad_fixture_skip_counts_per_reason(tmp_path):
    path, expected = write_bad_fixture(tmp_path)
    result = load_examples(path, on_error="skip")
    assert [e.source for e in result.examples] == [f"{path}:{n}" for n in (1, 20, 21)]
    assert result.n_read == 20  # 21 lines, one blank
    assert result.skipped_by_reason == {
        "invalid JSON": 1, "not an object": 1, "missing field": 3, "not a string": 1,
        "empty response": 2, "roles out of order": 3, "unknown role": 1, "bad history": 2,
        "not valid UTF-8": 1, "not a list": 1, "two system prompts": 1}
    assert len(result.bad) == sum(result.skipped_by_reason.values()) == len(expected)
    assert "skipped 17 bad" in result.summary()


def test_stop_message_is_capped_but_bad_keeps_all(tmp_path):
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"instruction": "q", "output": ""}] * 60 + [ALPACA]), "utf-8")
    with pytest.raises(DataError) as caught:
        load_examples(path)
    lines = str(caught.value).splitlines()
    assert len(caught.value.bad) == 60 and len(lines) == 1 + 50 + 1
    assert lines[1] == f"  {path}:0: `output` is empty"
    assert lines[-1] == "  ... and 10 more"


def test_duplicates_are_counted_not_removed(tmp_path):
    rows = [ALPACA, MESSAGES, ALPACA, {"messages": MESSAGES["messages"]}, ALPACA,
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    result = load_examples(write_rows(tmp_path / "d.jsonl", rows))
    assert len(result.examples) == 6 and result.duplicates == 4
    # a different system prompt makes a different example
    rows = [ALPACA, {**ALPACA, "system": "s"}]
    assert load_examples(write_rows(tmp_path / "e.jsonl", rows)).duplicates == 0


def test_limit_keeps_first_valid_rows(tmp_path):
    rows = [{"instruction": "q"}] + [{**ALPACA, "output": str(i)} for i in range(5)]
    result = load_examples(write_rows(tmp_path / "d.jsonl", rows), on_error="skip", limit=2)
    assert [e.messages[-1]["content"] for e in result.examples] == ["0", "1"]
    assert result.n_read == 6 and result.skipped_by_reason == {"missing field": 1}
    with pytest.raises(ConfigError, match="--data.limit"):
        load_examples(tmp_path / "d.jsonl", limit=0)
    with pytest.raises(ConfigError, match="--data.on_error"):
        load_examples(tmp_path / "d.jsonl", on_error="ignore")  # type: ignore[arg-type]


def _examples(n: int) -> list[Example]:
    return [Example([{"role": "user", "content": str(i)}], f"f:{i}") for i in range(n)]


@pytest.mark.parametrize("val_size, n_val", [(0, 0), (0.1, 10), (0.25, 25), (0.001, 1), (7, 7),
                                             (99, 99)])
def test_split_sizes_and_determinism(val_size, n_val):
    examples = _examples(100)
    train, val = split(examples, val_size, seed=3)
    assert (len(train), len(val)) == (100 - n_val, n_val)
    assert sorted(e.source for e in train + val) == sorted(e.source for e in examples)
    assert split(examples, val_size, seed=3) == (train, val)
    assert train == sorted(train, key=examples.index) and val == sorted(val, key=examples.index)
    if 5 <= n_val < 95:  # a different seed draws a different set (not guaranteed for 1 row)
        assert split(examples, val_size, seed=4)[1] != val


@pytest.mark.parametrize("val_size", [1.0, 5, 0.99, 2.5, -0.1])
def test_split_errors_name_the_flag(val_size):
    n = 1 if val_size == 1.0 else 5
    with pytest.raises(ConfigError, match="--data.val_size"):
        split(_examples(n), val_size, seed=0)


def test_invalid_utf8(tmp_path):
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes(b'[\n{"instruction": "q", "output": "a"},\n{"instruction": "'
                    + "甄嬛".encode("gbk") + b'", "output": "a"}\n]')
    with pytest.raises(DataError, match=r"gbk.json: not valid UTF-8 at line 3 \(byte 0xd5\)"):
        load_examples(gbk)
    lines = tmp_path / "gbk.jsonl"
    lines.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "'
                      + "甄嬛".encode("gbk") + b'", "output": "a"}\n')
    with pytest.raises(DataError, match=re.escape(f"{lines}:2: not valid UTF-8 (byte 0xd5 at byte 18")):
        load_examples(lines)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(ALPACA), encoding="utf-16")
    with pytest.raises(DataError, match="UTF-16"):
        load_examples(utf16)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.json", " \n\n", "the file is empty"),
    ("object.json", '{"instruction": "q", "output": "a"}', "must hold a list of rows, got object"),
    ("none.json", "[]", "list of rows is empty"),
    ("lines.json", '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a"}',
     "name the file .jsonl"),
    ("broken.json", '[{"instruction": "q",\n "output": }]', "invalid JSON at line 2"),
    ("rows.csv", "instruction,output\nq,a\n", "expected a .json or .jsonl file"),
    ("allbad.jsonl", '{"output": "a"}\n', "no valid rows"),
])
def test_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as caught:
        load_examples(path, on_error="skip")
    assert str(caught.value).startswith(str(path))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        load_examples(tmp_path / "nope.jsonl")
