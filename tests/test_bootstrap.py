"""eval.bootstrap: the paired delta and its percentile-bootstrap interval, against an exact enumeration of every
resample of a small case and against scipy.stats.bootstrap; per-problem scores average the seeds."""
import itertools

import numpy as np
import pytest

from eval.bootstrap import paired_delta, problem_scores


def test_problem_scores_average_samples_then_seeds():
    seed0 = [{"id": "a", "correct": True}, {"id": "a", "correct": False}, {"id": "b", "correct": True},
             {"id": "b", "correct": True}]
    seed1 = [{"id": "a", "correct": True}, {"id": "a", "correct": True}, {"id": "b", "correct": False},
             {"id": "b", "correct": False}]
    assert problem_scores([seed0, seed1]) == {"a": (0.5 + 1.0) / 2, "b": (1.0 + 0.0) / 2}


def test_interval_matches_the_exact_bootstrap_distribution():
    """4 problems: all 4^4 resamples are equally likely; their means' 2.5/97.5% quantiles are the exact percentile
    interval, which 200,000 random resamples approximate."""
    a = {"p1": 1.0, "p2": 0.75, "p3": 0.25, "p4": 0.5}
    b = {"p1": 0.25, "p2": 0.75, "p3": 0.5, "p4": 0.0, "extra": 1.0}  # "extra": not in a, left out
    d = np.array([a[p] - b[p] for p in sorted(a)])
    exact = np.array([d[list(ix)].mean() * 100 for ix in itertools.product(range(4), repeat=4)])
    got = paired_delta(a, b, resamples=200_000, seed=1)
    assert got["problems"] == 4 and got["mean"] == pytest.approx(d.mean() * 100)
    assert got["ci95"] == pytest.approx(list(np.quantile(exact, [0.025, 0.975])), abs=0.6)
    assert got == paired_delta(a, b, resamples=200_000, seed=1)  # deterministic for a seed


def test_interval_agrees_with_scipy_on_a_benchmark_sized_case():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = {f"p{i}": float(v) for i, v in enumerate(rng.integers(0, 9, 40) / 8)}
    b = {f"p{i}": float(v) for i, v in enumerate(rng.integers(0, 9, 40) / 8)}
    d = np.array([a[p] - b[p] for p in sorted(a)]) * 100
    ref = stats.bootstrap((d,), np.mean, n_resamples=100_000, method="percentile", random_state=3).confidence_interval
    got = paired_delta(a, b, resamples=100_000, seed=0)
    assert got["ci95"] == pytest.approx([ref.low, ref.high], abs=0.5)  # two independent Monte Carlo estimates
    assert got["ci95"][0] < got["mean"] < got["ci95"][1]
