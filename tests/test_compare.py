"""Paired tests, Holm decisions, bootstrap intervals, determinism and flips."""

import numpy as np
import pytest

import math

from tunelab.evaluate.compare import (
    PERMUTATION_TEST, SIGN_TEST, bootstrap_delta_ci, compare, compare_suite, flips, holm, permutation_test, sign_test,
)


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
    assert set(out["deltas"]["run"]) == {"delta", "ci_low", "ci_high", "confidence", "n_boot", "significant",
                                         "test", "n", "up", "down", "p_value", "p_adjusted", "decision"}
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


def _binary_suite(n, up, down, base_right=0):
    """n items: `up` wrong -> right, `down` right -> wrong, `base_right` right for both."""
    ids = [f"q{i:03d}" for i in range(n)]
    base = [0.0] * up + [1.0] * down + [1.0] * base_right + [0.0] * (n - up - down - base_right)
    run = [1.0] * up + [0.0] * down + [1.0] * base_right + [0.0] * (n - up - down - base_right)
    return {"base": dict(zip(ids, base)), "run": dict(zip(ids, run))}


def test_sign_test_matches_the_binomial_by_hand():
    assert sign_test(4, 0) == 2 / 2 ** 4 == 0.125
    assert sign_test(3, 0) == 0.25
    assert sign_test(0, 0) == 1.0 and sign_test(1, 1) == 1.0
    # 40 up / 5 down: 2 * sum_{k<=5} C(45, k) / 2^45
    assert sign_test(40, 5) == pytest.approx(2 * sum(math.comb(45, k) for k in range(6)) / 2 ** 45)
    assert sign_test(40, 5) == sign_test(5, 40) < 1e-6


def test_old_false_gains_are_no_longer_decisions():
    # 246 binary items, 4 fixed and none broken: the percentile bootstrap called this a gain.
    delta = compare_suite(_binary_suite(246, 4, 0, base_right=150), "base").deltas["run"]
    assert delta.test == SIGN_TEST and (delta.n, delta.up, delta.down) == (246, 4, 0)
    assert delta.p_value == 0.125 and delta.decision == "no decision" and not delta.significant
    assert delta.ci_low > 0  # the interval still shows it, it no longer decides
    # The 6-item persona suite, 0/6 -> 3/6.
    delta = compare_suite(_binary_suite(6, 3, 0), "base").deltas["run"]
    assert delta.p_value == 0.25 and delta.decision == "no decision"


def test_a_real_effect_is_still_found():
    delta = compare_suite(_binary_suite(246, 40, 5, base_right=100), "base").deltas["run"]
    assert delta.p_value < 1e-6 and delta.decision == "gain" and delta.significant
    delta = compare_suite(_binary_suite(246, 5, 40, base_right=100), "base").deltas["run"]
    assert delta.decision == "loss"
    # a loss metric: lower is better, so a drop is a gain
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(60)]
    base = rng.normal(3.0, 0.3, 60)
    scores = {"base": dict(zip(ids, base)), "run": dict(zip(ids, base - 0.2 + rng.normal(0, 0.05, 60)))}
    delta = compare_suite(scores, "base", metric="loss", higher_is_better=False).deltas["run"]
    assert delta.test == PERMUTATION_TEST and delta.decision == "gain" and delta.p_value < 0.001


def test_holm_against_a_hand_computation():
    # sorted 0.01, 0.02, 0.03, 0.04 of m = 4: x4, x3, x2, x1 -> 0.04, 0.06, 0.06 (made monotone), 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 caps at 1, and the larger p cannot fall below it
    assert holm([]) == []


def test_holm_runs_over_every_suite_and_run_of_a_report():
    # alone, 9 up / 0 down is a gain (p = 2/512 = 0.0039); among 20 comparisons it is not
    # (Holm: 20 x 0.0039 = 0.078), because 19 others are pure noise.
    suites = {"s0": {"base": _binary_suite(50, 9, 0)["base"], "run": _binary_suite(50, 9, 0)["run"]}}
    alone = compare(suites, "base")["s0"].deltas["run"]
    assert alone.p_value == pytest.approx(2 / 512) and alone.decision == "gain"
    for k in range(1, 20):
        suites[f"s{k}"] = _binary_suite(50, 1, 1)
    together = compare(suites, "base")
    delta = together["s0"].deltas["run"]
    assert delta.p_adjusted == pytest.approx(20 * 2 / 512) and delta.decision == "no decision"
    assert all(c.deltas["run"].p_adjusted == 1.0 for name, c in together.items() if name != "s0")


def test_permutation_test_exact_and_sampled():
    # exact: 3 positive differences of 1 among 2^3 sign patterns, 2 reach |sum| 3
    assert permutation_test(np.array([1.0, 1.0, 1.0, 0.0])) == 0.25
    assert permutation_test(np.zeros(5)) == 1.0
    rng = np.random.default_rng(1)
    noise = rng.normal(size=200)
    assert permutation_test(noise, seed=0) == permutation_test(noise, seed=0) > 0.05
    assert permutation_test(noise + 0.5, seed=0) < 0.001
