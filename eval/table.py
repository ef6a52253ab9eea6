"""Result tables from eval.math summaries: rows = model/variant, columns = benchmarks.

    python -m eval.table runs/ --out results.md [--json results.json] [--metric avg@n]
    python -m eval.table runs/base/aime24/summary.json runs/bias05/aime24/summary.json ... --out results.md

Arguments are summary.json files or directories (searched recursively for summary.json). Names come
from the path:  <variant>/<benchmark>/summary.json,  or  <variant>/<benchmark>/seed<S>/summary.json
for several seeds of one (variant, benchmark). With several summaries per cell the cell shows
mean ± std (sample standard deviation over seeds) and the JSON keeps every value.
The "Avg." column is the mean over benchmarks of a row's cell means (only when the row is complete).
A PNG bar chart (results.png next to --out) is drawn when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SEED_DIR = re.compile(r"seed[-_]?\d+")


def find_summaries(paths) -> list[Path]:
    """summary.json files named by `paths` (files as given, directories searched recursively)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.rglob("summary.json"))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(p)
    return found


def names_of(path: Path) -> tuple[str, str]:
    """(variant, benchmark) of a summary path, skipping a seed<S> directory."""
    d = path.parent
    if SEED_DIR.fullmatch(d.name):
        d = d.parent
    return d.parent.name, d.name


def collect(paths, metric: str) -> dict[str, dict[str, list[float]]]:
    """{variant: {benchmark: [metric value per seed]}}, in order of first appearance."""
    cells: dict[str, dict[str, list[float]]] = {}
    for path in find_summaries(paths):
        summary = json.loads(path.read_text())
        if metric not in summary:
            raise KeyError(f"{path} has no metric {metric!r} (has {sorted(summary)})")
        variant, bench = names_of(path)
        cells.setdefault(variant, {}).setdefault(bench, []).append(float(summary[metric]))
    if not cells:
        raise ValueError(f"no summary.json under {list(paths)}")
    return cells


def cell_stats(values: list[float]) -> dict:
    """mean, std (sample std, 0 for one seed) and the values of one table cell."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values), "values": values}


def _fmt(stats: dict | None) -> str:
    if stats is None:
        return "–"
    if stats.get("seeds", 1) > 1:
        return f"{stats['mean']:.1f} ± {stats['std']:.1f}"
    return f"{stats['mean']:.1f}"


def make_table(cells: dict[str, dict[str, list[float]]], metric: str) -> tuple[str, dict]:
    """Markdown table text and its JSON form {variant: {benchmark: cell_stats, "Avg.": ...}}."""
    benches: list[str] = []
    for row in cells.values():
        benches += [b for b in row if b not in benches]
    stats = {v: {b: cell_stats(row[b]) for b in benches if b in row} for v, row in cells.items()}
    with_avg = len(benches) > 1
    header = ["Model"] + benches + (["Avg."] if with_avg else [])
    lines = [f"{metric} (%)", "", "| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for variant, row in stats.items():
        cols = [_fmt(row.get(b)) for b in benches]
        if with_avg:
            if len(row) == len(benches):
                row["Avg."] = {"mean": statistics.fmean(row[b]["mean"] for b in benches)}  # of the means
            cols.append(_fmt(row.get("Avg.")))
        lines.append("| " + " | ".join([variant] + cols) + " |")
    return "\n".join(lines) + "\n", stats


def bar_chart(stats: dict, metric: str, path: Path) -> bool:
    """Grouped bars (benchmarks on x, one bar per variant, std as error bars). False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches: list[str] = []
    for row in stats.values():
        benches += [b for b in row if b not in benches and b != "Avg."]
    width = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(benches) + 2), 3.5))
    for i, (variant, row) in enumerate(stats.items()):
        xs = [j + i * width for j, b in enumerate(benches) if b in row]
        ax.bar(xs, [row[b]["mean"] for b in benches if b in row], width,
               yerr=[row[b]["std"] for b in benches if b in row], label=variant, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches)
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="Markdown table (and bar chart) from eval.math summaries.")
    ap.add_argument("paths", nargs="+", help="summary.json files or directories holding them")
    ap.add_argument("--out", required=True, help="Markdown output (the chart goes next to it as .png)")
    ap.add_argument("--json", help="also write the table's numbers as JSON")
    ap.add_argument("--metric", default="avg@n", help="summary key to tabulate: avg@n, maj@n, pass@1, ...")
    a = ap.parse_args(argv)

    table, stats = make_table(collect(a.paths, a.metric), a.metric)
    out = Path(a.out)
    out.write_text(table)
    print(table, end="")
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1) + "\n")
    png = out.with_suffix(".png")
    if bar_chart(stats, a.metric, png):
        print(f"bar chart: {png}")
    else:
        print("bar chart skipped: matplotlib is not installed (pip install matplotlib)")
    return table


if __name__ == "__main__":
    main()
