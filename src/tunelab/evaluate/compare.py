"""Compare tuned models with their base on the same items: means, deltas, CIs, flips.

Input is per-item scores, `{model: {item_id: score}}` for one suite, where a score is
0/1 (a probe passed) or a float (ROUGE-L, char F1, a per-item loss). Every model must
have scored exactly the same items: comparing different item sets would report a
difference that is partly a difference in questions.

The delta's uncertainty is a paired bootstrap over items: resample item indices with
replacement, take the mean of (model - base) on the resample, repeat `n_boot` times, and
report the percentile interval. Pairing matters: base and tuned answered the same
questions, so item difficulty cancels and the interval is much tighter than comparing
two independent means. Every model is resampled with the same indices (same seed), so
results do not depend on how many models are compared or in which order, and the whole
comparison is deterministic for a seed.

`SuiteComparison.to_dict()` is exactly one entry of `results["suites"]` in `report.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["Delta", "Flips", "SuiteComparison", "bootstrap_delta_ci", "compare", "compare_suite", "flips"]

# Resamples are drawn in chunks so memory stays near this many indices for any suite size.
_CHUNK_INDICES = 4_000_000


@dataclass
class Delta:
    """A tuned model's mean minus the base mean, with its bootstrap interval."""

    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    significant: bool
    """The interval excludes 0; only then does the report colour the delta."""


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
) -> SuiteComparison:
    """Means, deltas vs `base` with paired-bootstrap CIs, and flips for one suite.

    Args:
        scores: model name -> item id -> score; the base must be one of the models.
        base: Name of the base model in `scores`.
        suite: Suite name, for messages.
        metric: What a per-item score is (`accuracy`, `rouge_l`, `loss`), for the report.
        higher_is_better: False for losses; the report then calls a negative delta a gain.
        n_boot: Bootstrap resamples.
        confidence: Coverage of the intervals.
        seed: Bootstrap seed; the comparison is deterministic for a seed.
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
        deltas[model] = Delta(
            delta=means[model] - means[base], ci_low=low, ci_high=high, confidence=confidence,
            n_boot=n_boot, significant=low > 0 or high < 0,
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
    return SuiteComparison(suite, base, metric, higher_is_better, item_ids, means, deltas, flip_sets, by_group)


def compare(
    suites: Mapping[str, Mapping[str, Mapping[str, float]]],
    base: str,
    **options: Any,
) -> dict[str, SuiteComparison]:
    """`compare_suite` for each suite: suite -> model -> item id -> score."""
    return {name: compare_suite(scores, base, suite=name, **options) for name, scores in suites.items()}
