"""The server's continuous batching: requests that arrive over time, for different adapters,
decoded in shared batches, answer exactly as `Engine.complete` answers each alone; adapters
PEFT cannot mix (IA3) are batched one at a time; prefix tuning is refused; a cancelled
request leaves; a sampled request is reproducible from its seed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from test_generate import conversations, make_run, save_peaked
from tunelab.batching import Batcher
from tunelab.config import GenerationConfig
from tunelab.generate import Engine

GEN = GenerationConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_peaked(tmp_path_factory.mktemp("peaked"), "qwen2")


def submit_all(batcher: Batcher, jobs: list[tuple[list[int], str]], spread: float = 0.01):
    """Submit jobs a little apart (so they join a running batch); wait for every answer."""
    events, requests = [], []
    for prompt, adapter in jobs:
        done = threading.Event()
        events.append(done)
        requests.append(batcher.submit(prompt, adapter, GEN, lambda t, d=done: t is None and d.set()))
        time.sleep(spread)
    assert all(e.wait(60) for e in events)
    return requests


@pytest.mark.parametrize("kinds", [("lora", "lora2", "ptuning"), ("ia3", "ptuning")])
def test_requests_arriving_over_time_answer_as_each_alone(base, tmp_path, kinds):
    runs = {kind: make_run(tmp_path, base, kind, seed) for seed, kind in enumerate(kinds, 1)}
    engine = Engine.from_runs(runs)
    prompts = [engine.format.prompt_ids(c) for c in conversations()]
    alone = {a: engine.complete(prompts, GEN, adapter=a) for a in engine.adapters}
    batcher = Batcher(engine, max_rows=8, max_prompt_tokens=128, max_new_tokens=32)
    jobs = [(p, a) for a in engine.adapters for p in prompts] * 2
    requests = submit_all(batcher, jobs)
    stats = batcher.stats()
    batcher.close()
    got = [engine.cut_at_stop(r.tokens) for r in requests]
    want = [alone[a][prompts.index(p)] for p, a in jobs]
    assert got == want
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert stats["peak_rows"] > 1  # requests shared decoding steps
    assert stats["mixes_adapters"] == ("ia3" not in kinds)
    assert (stats["mixed_steps"] > 0) == ("ia3" not in kinds)


def test_prefix_tuning_is_refused_and_a_cancelled_request_leaves(base, tmp_path):
    with pytest.raises(ValueError, match="prefix"):
        Batcher(Engine.from_runs({"prefix": make_run(tmp_path, base, "prefix", 6)}))
    engine = Engine.from_runs({"lora": make_run(tmp_path, base, "lora", 1)})
    batcher = Batcher(engine, max_rows=4, max_prompt_tokens=128, max_new_tokens=512)
    prompt = engine.format.prompt_ids(conversations()[0])
    done = threading.Event()
    seen = []
    request = batcher.submit(prompt, "lora", GenerationConfig(max_new_tokens=512),
                             lambda t: done.set() if t is None else seen.append(t), ignore_eos=True)
    while len(seen) < 3:
        time.sleep(0.005)
    request.cancel()
    assert done.wait(10) and request.finish_reason == "cancelled" and len(request.tokens) < 512
    sampled = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=7)
    a, b = (batcher.generate(prompt, "lora", sampled).tokens for _ in range(2))
    assert a == b
    with pytest.raises(ValueError, match="max_new_tokens"):
        batcher.submit(prompt, "lora", GenerationConfig(max_new_tokens=1000), lambda t: None)
    batcher.close()


def test_a_longer_request_widens_the_ring_under_rows_that_have_wrapped(base, tmp_path):
    """Short rows fill a 64-column ring and wrap around it; a long prompt then widens it
    mid-answer: every row still answers as alone."""
    engine = Engine.from_runs({"lora": make_run(tmp_path, base, "lora", 1)})
    short = [engine.format.prompt_ids([{"role": "user", "content": q}]) for q in ("hi", "Who are you?")]
    long = engine.format.prompt_ids([{"role": "user", "content": " ".join(["The quick brown fox."] * 12)}])
    gen = GenerationConfig(max_new_tokens=28)
    assert max(map(len, short)) + 28 <= 64 < len(long) + 28
    batcher = Batcher(engine, max_rows=4, max_prompt_tokens=256, max_new_tokens=64)
    events = [threading.Event() for _ in range(3)]
    first = [batcher.submit(p, a, gen, lambda t, d=d: t is None and d.set(), ignore_eos=True)
             for p, a, d in zip(short, ("lora", "base"), events)]
    while len(first[0].tokens) < 10:  # (they joined at the ring's last columns: wrapped at once)
        time.sleep(0.002)
    assert batcher.ring.capacity == 64
    late = batcher.submit(long, "lora", gen, lambda t: t is None and events[2].set(), ignore_eos=True)
    while not late.tokens:
        time.sleep(0.001)
    widened, short_alive = batcher.ring.capacity, first[0].finish_reason is None
    assert all(e.wait(60) for e in events)
    batcher.close()
    assert widened > 64 and short_alive
    want = [engine.complete([short[0]], gen, adapter="lora", ignore_eos=True)[0],
            engine.complete([short[1]], gen, adapter="base", ignore_eos=True)[0],
            engine.complete([long], gen, adapter="lora", ignore_eos=True)[0]]
    assert [r.tokens for r in first + [late]] == want


def test_adapter_names_with_dots_answer_as_plain_names_do(base, tmp_path):
    """PEFT refuses "." in adapter names; a run named `lora-v1.5` (a label, a directory) is
    still served, alone and mixed with another adapter, exactly as under a plain name."""
    lora, lora2 = make_run(tmp_path, base, "lora", 1), make_run(tmp_path, base, "lora2", 2)
    plain = Engine.from_runs({"a": lora, "b": lora2})
    dotted = Engine.from_runs({"lora-v1.5": lora, "b.2": lora2})
    assert dotted.adapters == ["base", "lora-v1.5", "b.2"]
    prompts = [plain.format.prompt_ids(c) for c in conversations()]
    for p_name, d_name in [("a", "lora-v1.5"), ("b", "b.2"), ("base", "base")]:
        assert dotted.complete(prompts, GEN, adapter=d_name) == plain.complete(prompts, GEN, adapter=p_name)
    batcher = Batcher(dotted, max_rows=8, max_prompt_tokens=128, max_new_tokens=32)
    jobs = [(p, a) for a in dotted.adapters for p in prompts]
    requests = submit_all(batcher, jobs)
    stats = batcher.stats()
    batcher.close()
    want = {a: dotted.complete(prompts, GEN, adapter=a) for a in dotted.adapters}
    assert [dotted.cut_at_stop(r.tokens) for r in requests] == [want[a][prompts.index(p)] for p, a in jobs]
    assert stats["mixed_steps"] > 0
