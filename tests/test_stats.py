"""The bootstrap and the paired bootstrap against cases computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from peftlab.stats import (
    DEFAULT_RESAMPLES,
    bootstrap_ci,
    exp_ratio_of,
    macro_f1_of,
    mean_of,
    mean_over,
    paired_bootstrap,
    percentile_interval,
    resample_indices,
)


def test_every_resample_of_three_values_gives_the_hand_computed_percentiles():
    # the 27 resamples of (1, 2, 3): sums 3..9 with counts 1, 3, 6, 7, 6, 3, 1. Sorted means: 1, 4/3 x3, 5/3 x6 ...
    # 2.5th percentile at position 0.025 * 26 = 0.65: 1 + 0.65 * (4/3 - 1); 97.5th at 25.35: 8/3 + 0.35 * (3 - 8/3)
    every = np.array(list(itertools.product(range(3), repeat=3)))
    ci = bootstrap_ci(mean_of([1.0, 2.0, 3.0]), 3, indices=every)
    assert ci.estimate == 2.0
    assert ci.lo == pytest.approx(1 + 0.65 / 3)
    assert ci.hi == pytest.approx(8 / 3 + 0.35 / 3)
    assert ci.resamples == 27 and ci.seed is None and ci.excludes_zero


def test_two_values_zero_and_one_give_the_interval_zero_to_one():
    # resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 % points are 0 and 1
    ci = bootstrap_ci(mean_of([0.0, 1.0]), 2)
    assert (ci.estimate, ci.lo, ci.hi) == (0.5, 0.0, 1.0)
    assert ci.resamples == DEFAULT_RESAMPLES and ci.seed == 0


def test_seeded_and_explicit():
    a = resample_indices(50, 100, seed=3)
    assert a.shape == (100, 50) and (a == resample_indices(50, 100, seed=3)).all()
    assert not (a == resample_indices(50, 100, seed=4)).all()
    values = np.linspace(0, 1, 50)
    assert bootstrap_ci(mean_of(values), 50, 300, 7) == bootstrap_ci(mean_of(values), 50, 300, 7)
    assert bootstrap_ci(mean_of(values), 50, 300, 7).resamples == 300


def test_percentile_interval_is_numpy_linear():
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_a_large_known_difference_excludes_zero():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.5).astype(float)  # ~50 % correct
    b = np.where(rng.random(400) < 0.6, 1.0, a)  # b fixes ~60 % of a's mistakes: ~80 % correct
    diff = paired_bootstrap(mean_of(a), mean_of(b), 400)
    assert diff.estimate == pytest.approx(b.mean() - a.mean())
    assert diff.lo > 0.2 and diff.excludes_zero
    assert paired_bootstrap(mean_of(b), mean_of(a), 400).hi < -0.2  # b - a with the roles swapped


def test_identical_runs_give_exactly_zero():
    values = np.random.default_rng(2).random(100)
    diff = paired_bootstrap(mean_of(values), mean_of(values.copy()), 100)
    assert (diff.estimate, diff.lo, diff.hi) == (0.0, 0.0, 0.0)
    assert not diff.excludes_zero


def test_pairing_cancels_the_shared_variation():
    # b = a + 0.01 on every example: unpaired the intervals overlap, paired the difference is exactly 0.01
    a = np.random.default_rng(3).random(200)
    diff = paired_bootstrap(mean_of(a), mean_of(a + 0.01), 200)
    assert diff.lo == pytest.approx(0.01) and diff.hi == pytest.approx(0.01) and diff.excludes_zero
    ca, cb = bootstrap_ci(mean_of(a), 200), bootstrap_ci(mean_of(a + 0.01), 200)
    assert ca.hi > cb.lo  # the separate intervals cannot tell


def test_ratio_perplexity_on_the_full_sample_is_the_direct_one():
    nll = [50.0, 80.0, 10.0, 33.3]
    tokens = [20, 31, 5, 12]  # unequal units: not the mean of per-unit perplexities
    ci = bootstrap_ci(exp_ratio_of(nll, tokens), 4)
    assert ci.estimate == pytest.approx(math.exp(sum(nll) / sum(tokens)), rel=1e-12)
    assert ci.estimate != pytest.approx(np.mean(np.exp(np.divide(nll, tokens))))
    assert ci.lo <= ci.estimate <= ci.hi


def test_macro_f1_matches_scikit_learn_on_every_resample():
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    stat = macro_f1_of(y, p, 3)
    idx = resample_indices(40, 20, seed=5)
    got = stat(idx)
    for row, value in zip(idx, got, strict=True):
        assert value == pytest.approx(f1_score(y[row], p[row], labels=[0, 1, 2], average="macro", zero_division=0))
    # a class never seen nor predicted counts 0, as scikit-learn with labels=range(classes)
    assert macro_f1_of([0, 1], [0, 1], 3)(np.array([[0, 1]]))[0] == pytest.approx(2 / 3)


def test_seeds_pooled_share_the_resamples():
    a, b = np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])
    pooled = bootstrap_ci(mean_over([mean_of(a), mean_of(b)]), 4, indices=np.array([[0, 0, 0, 0], [1, 1, 2, 2]]))
    assert pooled.estimate == 0.75
    assert (pooled.lo, pooled.hi) == percentile_interval(np.array([1.0, 0.5]))
