"""Compare tuned models with their base on the same items: means, deltas, tests, flips.

Input is per-item scores, `{model: {item_id: score}}` for one suite, where a score is
0/1 (a probe passed) or a float (ROUGE-L, char F1, a per-item loss). Every model must
have scored exactly the same items: comparing different item sets would report a
difference that is partly a difference in questions.

Whether a delta is a gain, a loss or neither is decided by a paired test, corrected for
every comparison the report makes:

- 0/1 scores: the exact sign test on the discordant pairs (exact McNemar). Only items
  whose score changed carry evidence; with `up` items fixed and `down` items broken,
  p = P(a split at least this uneven | each change is a fair coin), two-sided, from the
  binomial distribution with `math.comb`. 4 up / 0 down gives p = 0.125, not a gain,
  however many unchanged items surround them.
- other scores: a paired permutation test (sign flips of the per-item differences): exact
  over all 2^k flips of the k non-zero differences when k <= 16, else `n_perm` random
  flips with the add-one estimate (1 + hits) / (1 + n_perm).
- Holm's step-down correction over all comparisons in one report (every suite x every run
  vs the base): `holm_adjust`. `compare_suite` corrects over its own runs;
  `compare` and `tunelab eval` over every suite at once. The decision is "gain" or "loss"
  when the adjusted p is below `alpha` (0.05), else "no decision".

The interval shown with a delta is a paired bootstrap (resample item indices with
replacement, take the mean of model - base, percentile interval): it says how large the
change may be; it does not decide. Every model is resampled with the same indices (same
seed), so results do not depend on how many models are compared or in which order.

`SuiteComparison.to_dict()` is exactly one entry of `results["suites"]` in `report.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

__all__ = ["Delta", "Flips", "SuiteComparison", "bootstrap_delta_ci", "compare", "compare_suite", "flips",
           "holm", "holm_adjust", "permutation_test", "sign_test"]

ALPHA = 0.05
"""Family-wise error rate of one report's decisions (Holm)."""
SIGN_TEST = "exact sign test (McNemar, discordant pairs)"
PERMUTATION_TEST = "paired permutation test"

# Resamples are drawn in chunks so memory stays near this many indices for any suite size.
_CHUNK_INDICES = 4_000_000


@dataclass
class Delta:
    """A tuned model's mean minus the base mean: its interval, its test and the decision."""

    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    significant: bool
    """The Holm-adjusted p is below alpha: the decision is a gain or a loss."""
    test: str = ""
    """SIGN_TEST for 0/1 scores, PERMUTATION_TEST otherwise."""
    n: int = 0
    """Items compared."""
    up: int = 0
    """Items whose score rose (0 -> 1 for probes)."""
    down: int = 0
    """Items whose score fell."""
    p_value: float = 1.0
    """Two-sided p of the paired test, uncorrected."""
    p_adjusted: float = 1.0
    """Holm-adjusted over every comparison of the report (see `holm_adjust`)."""
    decision: str = "no decision"
    """"gain", "loss" (the metric's direction considered) or "no decision"."""


@dataclass
class Flips:
    """Items whose 0/1 score changed between the base and a tuned model (sorted ids)."""

    right_to_wrong: list[str]
    wrong_to_right: list[str]


@dataclass
class SuiteComparison:
    """One suite, every model; `to_dict()` is the report's suite schema."""

    suite: str
    base: str
    metric: str
    higher_is_better: bool
    item_ids: list[str]
    means: dict[str, float]
    deltas: dict[str, Delta]
    flips: dict[str, Flips]
    """Only for models whose scores (and the base's) are all 0 or 1."""
    by_group: dict[str, dict[str, Any]] = field(default_factory=dict)
    """group -> {"n": items, "means": {model: mean}}, when groups were given."""

    @property
    def n(self) -> int:
        return len(self.item_ids)

    def to_dict(self) -> dict[str, Any]:
        """The `results["suites"][name]` entry that `report.write_report` reads."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "n": self.n,
            "scores": {m: {"mean": v, "n": self.n} for m, v in self.means.items()},
            "deltas": {m: asdict(d) for m, d in self.deltas.items()},
            "flips": {m: asdict(f) for m, f in self.flips.items()},
        }
        if self.by_group:
            out["by_group"] = self.by_group
        return out


def bootstrap_delta_ci(
    base: np.ndarray,
    model: np.ndarray,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of mean(model - base) under a paired bootstrap over items.

    Args:
        base: Per-item scores of the base model.
        model: Per-item scores of the tuned model, same items in the same order.
        n_boot: Number of resamples.
        confidence: Coverage of the interval, e.g. 0.95.
        seed: Seed of the resampling; same seed, same interval.
    """
    if base.shape != model.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D score arrays, got {base.shape} and {model.shape}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    diff = model.astype(np.float64) - base.astype(np.float64)
    n = diff.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_INDICES // n)
    boot_means = np.concatenate([
        diff[rng.integers(0, n, size=(min(chunk, n_boot - start), n))].mean(axis=1)
        for start in range(0, n_boot, chunk)
    ])
    alpha = 1 - confidence
    low, high = np.quantile(boot_means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_test(up: int, down: int) -> float:
    """Two-sided exact sign test: p of a split at least as uneven as `up` vs `down`
    when each changed item is a fair coin (exact McNemar on the discordant pairs)."""
    if up < 0 or down < 0:
        raise ValueError(f"need counts >= 0, got {up} and {down}")
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(up, down) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def permutation_test(diff: np.ndarray, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(diff) = 0 by flipping the signs of the
    per-item differences: exact when at most 16 differences are non-zero, else `n_perm`
    random flips (add-one estimate, so p is never 0)."""
    nonzero = diff[diff != 0].astype(np.float64)
    k = nonzero.size
    if k == 0:
        return 1.0
    observed = abs(nonzero.sum()) - 1e-12 * max(1.0, abs(nonzero).sum())  # ties count as extreme
    if k <= 16:
        signs = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1) * 2 - 1
        return float((np.abs(signs @ nonzero) >= observed).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1000):
        signs = rng.integers(0, 2, size=(min(1000, n_perm - start), k)) * 2 - 1
        hits += int((np.abs(signs @ nonzero) >= observed).sum())
    return (1 + hits) / (1 + n_perm)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest of m is
    multiplied by (m - i), then made non-decreasing and capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _decide(delta: Delta, higher_is_better: bool, alpha: float) -> None:
    delta.significant = delta.p_adjusted < alpha and delta.delta != 0
    if not delta.significant:
        delta.decision = "no decision"
    else:
        delta.decision = "gain" if (delta.delta > 0) == higher_is_better else "loss"


def holm_adjust(comparisons: Iterable["SuiteComparison"], alpha: float = ALPHA) -> int:
    """Holm-correct every delta of `comparisons` as one family and set each decision;
    returns the number of comparisons in the family."""
    comparisons = list(comparisons)
    family = [(c, d) for c in comparisons for d in c.deltas.values()]
    for (c, d), adjusted in zip(family, holm([d.p_value for _, d in family])):
        d.p_adjusted = adjusted
        _decide(d, c.higher_is_better, alpha)
    return len(family)


def _is_binary(scores: np.ndarray) -> bool:
    return bool(np.isin(scores, (0.0, 1.0)).all())


def flips(base: Mapping[str, float], model: Mapping[str, float]) -> Optional[Flips]:
    """Items right for the base and wrong for the model, and the reverse; None unless 0/1."""
    ids = sorted(base)
    if not (_is_binary(np.array([base[i] for i in ids])) and _is_binary(np.array([model[i] for i in ids]))):
        return None
    return Flips(
        right_to_wrong=[i for i in ids if base[i] == 1 and model[i] == 0],
        wrong_to_right=[i for i in ids if base[i] == 0 and model[i] == 1],
    )


def compare_suite(
    scores: Mapping[str, Mapping[str, float]],
    base: str,
    *,
    suite: str = "",
    metric: str = "accuracy",
    higher_is_better: bool = True,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Optional[Mapping[str, str]] = None,
    alpha: float = ALPHA,
    n_perm: int = 10_000,
) -> SuiteComparison:
    """Means, deltas vs `base` with paired tests and bootstrap CIs, and flips for one suite.

    The decisions are Holm-corrected over this suite's runs only; `holm_adjust` redoes
    them over a whole report.

    Args:
        scores: model name -> item id -> score; the base must be one of the models.
        base: Name of the base model in `scores`.
        suite: Suite name, for messages.
        metric: What a per-item score is (`accuracy`, `rouge_l`, `loss`), for the report.
        higher_is_better: False for losses; the report then calls a negative delta a gain.
        n_boot: Bootstrap resamples.
        confidence: Coverage of the intervals.
        seed: Bootstrap (and random permutation) seed; the comparison is deterministic for a seed.
        alpha: Family-wise error rate of the decisions.
        n_perm: Random sign flips of the permutation test when it cannot be exact.
        groups: Optional item id -> group (a probe's category) for per-group means.
    """
    label = f"suite {suite!r}: " if suite else ""
    if base not in scores:
        raise ValueError(f"{label}base model {base!r} has no scores (models: {', '.join(scores)})")
    item_ids = sorted(scores[base])  # sorted, so the resamples do not depend on dict order
    if not item_ids:
        raise ValueError(f"{label}no items scored")
    expected = set(item_ids)
    arrays: dict[str, np.ndarray] = {}
    for model, per_item in scores.items():
        if set(per_item) != expected:
            missing, extra = sorted(expected - set(per_item)), sorted(set(per_item) - expected)
            raise ValueError(f"{label}model {model!r} scored different items than {base!r}: "
                             f"missing {missing[:5]}, extra {extra[:5]}")
        values = np.array([float(per_item[i]) for i in item_ids])
        if not np.isfinite(values).all():
            bad = [i for i, v in zip(item_ids, values) if not math.isfinite(v)]
            raise ValueError(f"{label}model {model!r} has non-finite scores for {bad[:5]}")
        arrays[model] = values

    means = {model: float(values.mean()) for model, values in arrays.items()}
    deltas: dict[str, Delta] = {}
    flip_sets: dict[str, Flips] = {}
    for model, values in arrays.items():
        if model == base:
            continue
        low, high = bootstrap_delta_ci(arrays[base], values, n_boot, confidence, seed)
        diff = values - arrays[base]
        up, down = int((diff > 0).sum()), int((diff < 0).sum())
        binary = _is_binary(values) and _is_binary(arrays[base])
        p = sign_test(up, down) if binary else permutation_test(diff, n_perm, seed)
        deltas[model] = Delta(
            delta=means[model] - means[base], ci_low=low, ci_high=high, confidence=confidence,
            n_boot=n_boot, significant=False, test=SIGN_TEST if binary else PERMUTATION_TEST,
            n=len(item_ids), up=up, down=down, p_value=p, p_adjusted=p,
        )
        changed = flips(scores[base], scores[model])
        if changed is not None:
            flip_sets[model] = changed

    by_group: dict[str, dict[str, Any]] = {}
    if groups is not None:
        for group in sorted({groups.get(i, "") for i in item_ids}):
            mask = np.array([groups.get(i, "") == group for i in item_ids])
            by_group[group or "(none)"] = {
                "n": int(mask.sum()),
                "means": {model: float(values[mask].mean()) for model, values in arrays.items()},
            }
    result = SuiteComparison(suite, base, metric, higher_is_better, item_ids, means, deltas, flip_sets, by_group)
    holm_adjust([result], alpha)
    return result


def compare(
    suites: Mapping[str, Mapping[str, Mapping[str, float]]],
    base: str,
    **options: Any,
) -> dict[str, SuiteComparison]:
    """`compare_suite` for each suite (suite -> model -> item id -> score), its decisions
    Holm-corrected over every suite and run together."""
    out = {name: compare_suite(scores, base, suite=name, **options) for name, scores in suites.items()}
    holm_adjust(out.values(), options.get("alpha", ALPHA))
    return out
