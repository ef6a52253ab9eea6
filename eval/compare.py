"""eval.table's comparisons: paired avg@n differences with bootstrap intervals (--baseline, --pairs; the math is
eval/bootstrap.py's) and each row's training cost (run_summary.json of the runs its models came from).

Per (row, benchmark) cell the summaries' directories hold samples.jsonl (eval.math): the per-problem scores of
the cell's seeds are averaged (bootstrap.problem_scores), and two rows are compared on the problems both have.
A row's cost: each cell's settings.json names its model directory; the run that trained it is the nearest
directory above it with a run_summary.json (train.py writes it: runs/<run>/seed<S>/hf/best -> runs/<run>/seed<S>);
the row's cost is the mean over its distinct runs. A model without one (a downloaded base) has no cost."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from eval.bootstrap import paired_delta, problem_scores

COST_KEYS = ("train_seconds", "tokens_trained", "tokens_generated_rollout", "tokens_generated_validation")


class CompareError(ValueError):
    """A comparison that cannot be made (the CLI prints it as one line)."""


def _samples(summary_path: Path) -> list[dict]:
    path = summary_path.parent / "samples.jsonl"
    if not path.is_file():
        raise CompareError(f"{path}: missing (the paired intervals need eval.math's per-sample results)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_pairs(text: str, rows: list[str]) -> list[tuple[str, str]]:
    """'A-B,C-D' -> [(A, B), (C, D)]; a row name may itself hold '-': the split is the one naming two rows."""
    pairs = []
    for item in text.split(","):
        splits = [(item[:i], item[i + 1:]) for i, c in enumerate(item) if c == "-"]
        found = [(a, b) for a, b in splits if a in rows and b in rows and a != b]
        if len(found) != 1:
            raise CompareError(f"--pairs {item!r}: expected A-B with A and B two different rows of the table "
                               f"(rows: {', '.join(rows)})")
        pairs.append(found[0])
    return pairs


def deltas(sources: dict[tuple[str, str], list[Path]], comparisons: list[tuple[str, str]], *, resamples: int,
           seed: int) -> dict[tuple[str, str], dict[str, dict]]:
    """{(A, B): {benchmark: paired_delta(A, B) + {"baseline": B}}} for every benchmark both rows have."""
    scores: dict[tuple[str, str], dict[str, float]] = {}

    def of(row, bench):
        if (row, bench) not in scores:
            scores[row, bench] = problem_scores([_samples(p) for p in sources[row, bench]])
        return scores[row, bench]
    out = {}
    for a, b in comparisons:
        benches = [bench for (row, bench) in sources if row == a and (b, bench) in sources]
        out[a, b] = {}
        for bench in benches:
            sa, sb = of(a, bench), of(b, bench)
            try:
                d = paired_delta(sa, sb, resamples=resamples, seed=seed)
            except ValueError:
                raise CompareError(f"rows {a!r} and {b!r} share no problem on {bench!r}") from None
            out[a, b][bench] = {"baseline": b, **d}
    return out


def run_cost(model_dir: str | None) -> dict | None:
    """The run_summary.json nearest above model_dir (3 levels at most), or None."""
    if not model_dir:
        return None
    d = Path(model_dir)
    for _ in range(4):
        if (d / "run_summary.json").is_file():
            return json.loads((d / "run_summary.json").read_text())
        d = d.parent
    return None


def row_costs(sources: dict[tuple[str, str], list[Path]]) -> dict[str, dict]:
    """{row: {COST_KEYS: mean over the row's distinct runs, "runs": n}} for rows whose runs all have a cost."""
    runs: dict[str, dict[str, dict | None]] = {}
    for (row, _), paths in sources.items():
        for p in paths:
            settings = p.parent / "settings.json"
            model = json.loads(settings.read_text()).get("model") if settings.is_file() else None
            runs.setdefault(row, {})[model or str(p)] = run_cost(model)
    out = {}
    for row, by_model in runs.items():
        costs = list(by_model.values())
        if costs and all(c is not None for c in costs):
            out[row] = {k: statistics.fmean(c.get(k, 0) for c in costs) for k in COST_KEYS} | {"runs": len(costs)}
    return out


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def delta_table(results: dict[tuple[str, str], dict[str, dict]], benches: list[str], title: str) -> list[str]:
    """Markdown lines: one row per comparison A - B, cells `+11.5 [8.1, 14.9]` (points of avg@n)."""
    lines = ["", title, "", "| " + " | ".join(["Rows"] + benches) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * len(benches)) + "|"]
    for (a, b), cells in results.items():
        cols = [f"{_signed(c['mean'])} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]" if (c := cells.get(x)) else "–"
                for x in benches]
        lines.append("| " + " | ".join([f"{a} − {b}"] + cols) + " |")
    return lines


def cost_table(costs: dict[str, dict], rows: list[str]) -> list[str]:
    lines = ["", "cost per run (train.py's run_summary.json; means over the row's runs)", "",
             "| Model | train s | tokens trained | tokens generated (rollouts) | tokens generated (validation) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        c = costs.get(row)
        cols = ["–"] * 4 if c is None else [f"{c['train_seconds']:.0f}"] + [f"{c[k]:,.0f}" for k in COST_KEYS[1:]]
        lines.append("| " + " | ".join([row] + cols) + " |")
    return lines
