"""Paired differences in avg@n with a bootstrap interval over problems (eval.table's --baseline / --pairs).

For rows A and B evaluated on the same problems P (seeds s = 1..S each, n samples per problem and seed):
    x_p(A)  = mean over A's seeds of the share of correct samples of problem p   (avg@n of p, seeds averaged)
    d_p     = x_p(A) - x_p(B)                                                    (paired by problem id)
    delta   = 100 * mean_{p in P} d_p                                            (points of avg@n)
    ci95    = the 2.5% and 97.5% quantiles of 100 * mean_{p in P*} d_p over R resamples P* of P drawn with
              replacement (the percentile bootstrap; numpy.random.default_rng(seed): deterministic)
Resampling problems (not samples) makes the interval cover the uncertainty of the problem set, which dominates
on benchmarks of 15-40 problems; averaging the seeds of each problem inside each resample keeps the seed
variance in the per-problem scores. Problems only one row has are left out (counted by the caller).
"""
from __future__ import annotations

import numpy as np


def problem_scores(runs: list[list[dict]]) -> dict[str, float]:
    """{problem id: share of correct samples, averaged over runs (seeds)} from samples.jsonl records; a problem
    missing from some seed is averaged over the seeds that have it."""
    per_seed: dict[str, list[float]] = {}
    for samples in runs:
        by_id: dict[str, list[bool]] = {}
        for s in samples:
            by_id.setdefault(s["id"], []).append(bool(s["correct"]))
        for pid, c in by_id.items():
            per_seed.setdefault(pid, []).append(sum(c) / len(c))
    return {pid: sum(v) / len(v) for pid, v in per_seed.items()}


def paired_delta(a: dict[str, float], b: dict[str, float], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """delta, ci95 (points of avg@n) of a - b over their common problems (module docstring)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("no problem in common")
    d = np.array([a[p] - b[p] for p in common])                                        # [P]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))                            # [R, P]
    means = d[idx].mean(axis=1) * 100                                                  # [R]
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean": float(d.mean() * 100), "ci95": [float(lo), float(hi)], "problems": len(common),
            "resamples": resamples, "seed": seed}
