"""Paired bootstrap deltas, determinism and flips."""

import numpy as np
import pytest

from tunelab.evaluate.compare import bootstrap_delta_ci, compare, compare_suite, flips


def _synthetic(n=400, p_base=0.8, p_drop=0.15, seed=1):
    """Base right on ~80% of items; the run loses each right item with prob 0.15."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < p_base).astype(float)
    run = np.where(rng.random(n) < p_drop, 0.0, base)
    ids = [f"q{i:03d}" for i in range(n)]
    return {"base": dict(zip(ids, base)), "lora": dict(zip(ids, run))}, -p_base * p_drop


def test_ci_contains_true_delta_and_is_significant():
    scores, true_delta = _synthetic()
    result = compare_suite(scores, "base", suite="general")
    delta = result.deltas["lora"]
    assert delta.ci_low <= true_delta <= delta.ci_high
    assert delta.ci_low <= delta.delta <= delta.ci_high
    assert delta.delta == pytest.approx(result.means["lora"] - result.means["base"])
    assert delta.significant and delta.ci_high < 0


def test_ci_covers_zero_when_nothing_changed():
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(200)]
    base = dict(zip(ids, (rng.random(200) < 0.5).astype(float)))
    noisy = dict(zip(ids, (rng.random(200) < 0.5).astype(float)))  # same rate, independent
    delta = compare_suite({"base": base, "run": noisy}, "base").deltas["run"]
    assert delta.ci_low < 0 < delta.ci_high or not delta.significant


def test_deterministic_for_a_seed_and_independent_of_dict_order():
    scores, _ = _synthetic()
    a = compare_suite(scores, "base", seed=7).deltas["lora"]
    b = compare_suite(scores, "base", seed=7).deltas["lora"]
    shuffled = {m: dict(reversed(list(s.items()))) for m, s in scores.items()}
    c = compare_suite(shuffled, "base", seed=7).deltas["lora"]
    assert a == b == c
    # Float scores, so intervals from different seeds cannot coincide on a grid of 1/n.
    rng = np.random.default_rng(3)
    base, run = rng.normal(size=50), rng.normal(size=50)
    assert bootstrap_delta_ci(base, run, seed=1) == bootstrap_delta_ci(base, run, seed=1)
    assert bootstrap_delta_ci(base, run, seed=1) != bootstrap_delta_ci(base, run, seed=2)


def test_identical_scores_give_zero_width_interval():
    scores = {"base": {"a": 1.0, "b": 0.0}, "run": {"a": 1.0, "b": 0.0}}
    delta = compare_suite(scores, "base").deltas["run"]
    assert (delta.delta, delta.ci_low, delta.ci_high, delta.significant) == (0.0, 0.0, 0.0, False)


def test_chunked_bootstrap_matches_bounds():
    base, run = np.zeros(5), np.ones(5)
    assert bootstrap_delta_ci(base, run, n_boot=50) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_delta_ci(np.zeros(3), np.zeros(4))


def test_flips():
    base = {"a": 1, "b": 1, "c": 0, "d": 0}
    run = {"a": 0, "b": 1, "c": 1, "d": 0}
    f = flips(base, run)
    assert f.right_to_wrong == ["a"] and f.wrong_to_right == ["c"]
    assert flips({"a": 0.5}, {"a": 1.0}) is None  # float scores have no flips


def test_suite_dict_matches_report_schema_and_groups():
    scores = {"base": {"a": 1, "b": 1, "c": 0}, "run": {"a": 0, "b": 1, "c": 0}}
    result = compare_suite(scores, "base", suite="general", groups={"a": "math", "b": "math", "c": "facts"})
    out = result.to_dict()
    assert out["n"] == 3 and out["scores"]["base"] == {"mean": pytest.approx(2 / 3), "n": 3}
    assert set(out["deltas"]["run"]) == {"delta", "ci_low", "ci_high", "confidence", "n_boot", "significant"}
    assert out["flips"]["run"] == {"right_to_wrong": ["a"], "wrong_to_right": []}
    assert out["by_group"]["math"] == {"n": 2, "means": {"base": 1.0, "run": 0.5}}


def test_float_scores_have_means_but_no_flips():
    scores = {"base": {"a": 0.2, "b": 0.4}, "run": {"a": 0.6, "b": 0.8}}
    result = compare_suite(scores, "base", metric="rouge_l")
    assert result.deltas["run"].delta == pytest.approx(0.4)
    assert result.flips == {}


def test_mismatched_items_and_bad_scores_are_errors():
    with pytest.raises(ValueError, match="scored different items.*missing \\['b'\\]"):
        compare_suite({"base": {"a": 1, "b": 0}, "run": {"a": 1}}, "base", suite="s")
    with pytest.raises(ValueError, match="base model 'nope'"):
        compare_suite({"base": {"a": 1}}, "nope")
    with pytest.raises(ValueError, match="non-finite"):
        compare_suite({"base": {"a": 1}, "run": {"a": float("nan")}}, "base")


def test_compare_many_suites():
    suites = {"general": {"base": {"a": 1}, "run": {"a": 0}}, "persona": {"base": {"x": 0}, "run": {"x": 1}}}
    out = compare(suites, "base", n_boot=10)
    assert out["general"].deltas["run"].delta == -1 and out["persona"].deltas["run"].delta == 1
