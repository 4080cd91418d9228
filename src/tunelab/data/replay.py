"""Replay rows: the bundled general prompts, and how replay rows join each optimizer step.

`mix` adds a fixed share of replay rows to a step's training rows, drawn in a fixed
permutation per pass over the replay set, so a resumed run sees exactly the rows an
uninterrupted one would. Rows whose answer tokens also carry the KL-to-base term
(`mitigate.py`) are `KLRow`s: the same ids and labels, marked for the step only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .template import Rendered

PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "replay" / "general_prompts.jsonl"
"""The bundled general prompts (Chinese and English), disjoint from every evaluation probe
(tests/test_replay.py)."""


@dataclass
class KLRow(Rendered):
    """A row whose answer tokens carry the KL-to-base term in this step's loss."""


def load_prompts(limit: Optional[int] = None, path: Path = PROMPTS) -> list[dict]:
    """The prompt records (`id`, `lang`, `category`, `prompt`), the first `limit` of them.
    The file alternates English and Chinese, so any prefix holds both."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:limit] if limit else records


def prompts_sha256(prompts: list[dict]) -> str:
    return hashlib.sha256(json.dumps([p["prompt"] for p in prompts], ensure_ascii=False).encode()).hexdigest()


def replay_count(batch_size: int, ratio: float) -> int:
    """Replay rows added to a step of `batch_size` training rows so that they are `ratio` of
    the step's rows (at least one when `ratio` > 0)."""
    if ratio <= 0:
        return 0
    return max(1, round(batch_size * ratio / (1 - ratio)))


def mix(rows: list[Rendered], replay: list[Rendered], ratio: float, batch_size: int, step: int, seed: int,
        kl_on: Optional[str] = None) -> list[Rendered]:
    """Step `step`'s rows: its training `rows` plus its share of `replay` rows. With `kl_on`
    ("replay" or "all") the rows the KL term covers come back as `KLRow`s."""
    n = replay_count(batch_size, ratio) if replay else 0
    chosen = []
    for k in range(step * n, (step + 1) * n):  # the k-th replay row drawn in the whole run
        cycle, index = divmod(k, len(replay))
        order = torch.randperm(len(replay), generator=torch.Generator().manual_seed(seed + 7919 * (cycle + 1)))
        chosen.append(replay[order[index].item()])
    marked = lambda r: KLRow(r.input_ids, r.labels, r.truncated)  # noqa: E731
    if kl_on == "all":
        return [marked(r) for r in rows + chosen]
    if kl_on == "replay":
        return list(rows) + [marked(r) for r in chosen]
    return list(rows) + chosen
