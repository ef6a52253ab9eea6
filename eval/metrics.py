"""Sample-level metrics for math evaluation. Pure functions; every metric is a fraction in [0, 1]
here and turned into percent by summarize().

For a problem with n samples of which c are correct:
    avg@n   = c / n                                            (mean accuracy; the blog's main metric)
    pass@k  = 1 - C(n-c, k) / C(n, k)                           (Chen et al. 2021, unbiased for k <= n)
            = 1 - prod_{i=n-c+1}^{n} (1 - k / i)                (the product form: no huge binomials)
    maj@k   = 1[majority answer of the first k samples is equivalent to the gold answer]
              (reward.majority_vote's equivalence clusters; a tie for first place counts as wrong)
Each metric is averaged over problems (every problem weighs the same, whatever its length).
"""

from __future__ import annotations

from reward import answers_equivalent, majority_vote


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_n(correct: list[list[bool]]) -> float:
    """Mean over problems of the share of correct samples (correct[p][s] for problem p, sample s)."""
    if not correct:
        raise ValueError("avg_at_n of no problems")
    return sum(sum(map(bool, c)) / len(c) for c in correct) / len(correct)


def maj_at_k(answers: list[str | None], gold: str, k: int) -> float:
    """1.0 if the majority answer among answers[:k] is equivalent to gold, else 0.0.

    answers are extracted final answers (None = no answer). A tie for the largest cluster, or no
    answer at all, gives 0.0: majority voting produced no answer.
    """
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k needs 1 <= k <= {len(answers)}, got {k}")
    majority, _ = majority_vote(answers[:k])
    return 1.0 if majority is not None and answers_equivalent(majority, gold) else 0.0


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n (the k's reported for pass@k)."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks


def _group(samples: list[dict]) -> dict[str, list[dict]]:
    problems: dict[str, list[dict]] = {}
    for s in samples:
        problems.setdefault(s["id"], []).append(s)
    return problems


def _problem_metrics(problems: dict[str, list[dict]], n: int) -> dict:
    """Metrics in percent over the given problems (each a list of n sample records)."""
    ordered = [sorted(v, key=lambda s: s["sample"]) for v in problems.values()]
    flat = [s for p in ordered for s in p]
    out = {"problems": len(ordered), "n": n,
           "avg@n": 100 * avg_at_n([[s["correct"] for s in p] for p in ordered])}
    for k in powers_of_two(n):
        out[f"pass@{k}"] = 100 * sum(pass_at_k(n, sum(s["correct"] for s in p), k) for p in ordered) / len(ordered)
    out["maj@n"] = 100 * sum(maj_at_k([s["answer"] for s in p], p[0]["gold"], n) for p in ordered) / len(ordered)
    out["mean_length"] = sum(s["length"] for s in flat) / len(flat)
    out["truncated"] = 100 * sum(s["truncated"] for s in flat) / len(flat)
    with_process = [s for s in flat if "process_ok" in s]
    if with_process:
        # process-verified accuracy: the final answer is right AND every intermediate step is right
        out["process_acc"] = 100 * sum(s["correct"] and s["process_ok"] for s in with_process) / len(with_process)
        out["process_step_frac"] = 100 * sum(s["process_frac"] for s in with_process) / len(with_process)
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}


def summarize(samples: list[dict]) -> dict:
    """Summary of sample records (eval/math.py's samples.jsonl lines).

    Each record: id, sample (index), answer (extracted or None), gold, correct (bool), length
    (tokens), truncated (bool); optionally process_ok / process_frac (synthetic problems) and k
    (difficulty, adds a per-k breakdown under "by_k"). Every problem must have the same number n of
    samples. Returns percentages: avg@n, pass@1, pass@2, ... (k <= n), maj@n, truncated,
    process_acc, process_step_frac; mean_length in tokens; problems; n.
    """
    problems = _group(samples)
    if not problems:
        raise ValueError("summarize: no samples")
    counts = {len(v) for v in problems.values()}
    if len(counts) != 1:
        raise ValueError(f"summarize: problems have different sample counts {sorted(counts)}")
    n = counts.pop()
    summary = _problem_metrics(problems, n)
    ks = {p[0]["k"] for p in problems.values() if "k" in p[0]}
    if ks:
        summary["by_k"] = {str(k): _problem_metrics({i: p for i, p in problems.items()
                                                     if "k" in p[0] and p[0]["k"] == k}, n)
                           for k in sorted(ks)}
    return summary
