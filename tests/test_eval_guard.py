"""`tunelab eval` compares runs on one held-out split only, rendered as training rendered it."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_jsonl
from tunelab.evaluate.runner import check_same_split, held_out_split


def _run(tmp_path, name, sha="ab" * 32, **data):
    run = tmp_path / name
    run.mkdir()
    config = {"data": {"path": "d.jsonl", "seed": 42, "val_size": 24, "limit": None, **data},
              "method": {"name": "lora"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "inputs.json").write_text(json.dumps({"data": {"sha256": sha, "size": 10}}))
    return str(run), config


def test_same_split_passes(tmp_path):
    (a, ca), (b, cb) = _run(tmp_path, "lora"), _run(tmp_path, "ptuning", lr=1)
    check_same_split({"lora": a, "ptuning": b}, {"lora": ca, "ptuning": cb})
    check_same_split({"lora": a}, {"lora": ca})


@pytest.mark.parametrize("change, field", [
    ({"sha": "cd" * 32}, "data sha256"), ({"seed": 7}, "data.seed"),
    ({"val_size": 30}, "data.val_size"), ({"limit": 100}, "data.limit"),
])
def test_other_split_is_refused_naming_runs_and_field(tmp_path, change, field):
    (a, ca), (b, cb) = _run(tmp_path, "lora"), _run(tmp_path, "ptuning", **change)
    with pytest.raises(ValueError, match=f"different data splits[\\s\\S]*{field}: lora has .*, ptuning has"):
        check_same_split({"lora": a, "ptuning": b}, {"lora": ca, "ptuning": cb})


class _Format:
    def __init__(self):
        self.truncations = []

    def render(self, messages, max_length, supervise, truncation):
        from tunelab.data import Rendered
        self.truncations.append(truncation)
        long = len(messages[-1]["content"]) > 20
        if long and truncation == "drop":
            return None
        return Rendered([1, 2, 3], [-100, 5, 6])


def test_held_out_rows_use_the_runs_truncation(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": ("x" * 30 if i % 2 else "short")} for i in range(10)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    engine = type("E", (), {"format": _Format()})()
    data = {"path": str(tmp_path / "d.jsonl"), "val_size": 4, "seed": 1, "truncation": "drop", "max_length": 8}
    examples, rendered = held_out_split(None, {"data": data}, engine)
    assert set(engine.format.truncations) == {"drop"}
    assert len(examples) == len(rendered) == sum(len(e.messages[-1]["content"]) <= 20 for e in examples) < 4
