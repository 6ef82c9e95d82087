"""Bootstrap confidence intervals over evaluation examples, and the paired bootstrap for a difference of two runs.

A statistic is a function of a resample: it takes an index matrix ``[resamples, n]`` (each row draws n example
indices with replacement) and returns one value per row. The point estimate is the statistic on the full sample (the
identity row); the interval is the percentile interval of the resampled values (numpy's linear interpolation).
Perplexity is a ratio estimator: blocks or responses are the resampled units, and each resample's perplexity is
exp(sum NLL / sum tokens) over its units. A paired bootstrap evaluates both runs on the same index rows, so the
example-to-example variation that both runs share cancels in the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from peftlab.errors import UserError

#: Resamples and seed of every interval the report shows (both are also explicit parameters).
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95

#: A statistic of resamples: index matrix [resamples, n] -> one value per resample.
ResampledStat = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval."""

    estimate: float
    lo: float
    hi: float
    resamples: int
    seed: int | None
    level: float = DEFAULT_LEVEL

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of zero (for a difference: a significant one)."""
        return self.lo > 0 or self.hi < 0


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """``[resamples, n]`` indices drawn with replacement by numpy's PCG64 generator seeded with ``seed``."""
    if n < 1:
        raise UserError("a bootstrap needs at least one evaluation example")
    if resamples < 1:
        raise UserError(f"resamples must be at least 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of resampled values (linear interpolation between order stats)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(stat: ResampledStat, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 level: float = DEFAULT_LEVEL, indices: np.ndarray | None = None) -> Interval:
    """The statistic on the full sample of ``n`` examples and its bootstrap interval.

    ``indices`` replaces the seeded draw (e.g. every possible resample of a tiny sample, to check by hand).
    """
    idx = resample_indices(n, resamples, seed) if indices is None else np.asarray(indices)
    estimate = float(stat(np.arange(n)[None, :])[0])
    lo, hi = percentile_interval(stat(idx), level)
    return Interval(estimate, lo, hi, len(idx), seed if indices is None else None, level)


def paired_bootstrap(stat_a: ResampledStat, stat_b: ResampledStat, n: int, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL,
                     indices: np.ndarray | None = None) -> Interval:
    """b - a on the same ``n`` examples, with the interval of the difference over shared resamples."""
    return bootstrap_ci(lambda idx: stat_b(idx) - stat_a(idx), n, resamples, seed, level, indices)


# --- the statistics of the tasks' metrics ------------------------------------------------------------------------
def mean_of(values: Sequence[float]) -> ResampledStat:
    """The mean of per-example values (accuracy from correctness, ROUGE-L, exact match)."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=1)


def exp_ratio_of(nll: Sequence[float], tokens: Sequence[float]) -> ResampledStat:
    """exp(sum NLL / sum tokens) of the resampled units: perplexity as a ratio estimator."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return lambda idx: np.exp(a[idx].sum(axis=1) / b[idx].sum(axis=1))


def macro_f1_of(labels: Sequence[int], predictions: Sequence[int], classes: int) -> ResampledStat:
    """Macro-F1 over all ``classes`` recomputed per resample (a class with no support nor prediction scores 0, as
    scikit-learn's ``zero_division=0``)."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)

    def stat(idx: np.ndarray) -> np.ndarray:
        ys, ps = y[idx], p[idx]
        scores = []
        for c in range(classes):
            tp = ((ys == c) & (ps == c)).sum(axis=1)
            denominator = (ys == c).sum(axis=1) + (ps == c).sum(axis=1)  # 2 tp + fp + fn
            scores.append(np.divide(2 * tp, denominator, out=np.zeros(len(idx)), where=denominator > 0))
        return np.mean(scores, axis=0)

    return stat


#: Statistic kinds a task's :class:`~peftlab.tasks.base.Statistic` may name -> (columns it reads, builder).
KINDS: dict[str, Callable[..., ResampledStat]] = {"mean": mean_of, "exp_ratio": exp_ratio_of,
                                                 "macro_f1": macro_f1_of}


def statistic(kind: str, columns: Mapping[str, Sequence[float]], names: Sequence[str],
              classes: int | None = None) -> ResampledStat:
    """The resampled statistic ``kind`` over the named per-example columns."""
    if kind not in KINDS:
        raise UserError(f"unknown bootstrap statistic {kind!r}; known: {', '.join(KINDS)}")
    args = [columns[name] for name in names]
    return KINDS[kind](*args, classes) if kind == "macro_f1" else KINDS[kind](*args)


def mean_over(stats: Sequence[ResampledStat]) -> ResampledStat:
    """The mean of several runs' statistics on the same resamples (a row's seeds pooled)."""
    if not stats:
        raise UserError("mean_over needs at least one statistic")
    return lambda idx: np.mean([s(idx) for s in stats], axis=0)
