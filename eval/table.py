"""Result tables from eval.math summaries: rows = model/variant, columns = benchmarks.

    python -m eval.table runs/ --out results.md [--json results.json] [--metric avg@n]
    python -m eval.table runs/base/aime24/summary.json runs/bias05/aime24/summary.json ... --out results.md

Arguments are summary.json files or directories (searched recursively for summary.json). Names come
from the path:  <row>/<benchmark>/summary.json,  or  <row>/<benchmark>/seed<S>/summary.json
for several seeds of one (row, benchmark); a directory named `eval` between them is skipped, so the
README's layout runs/<model>/eval/<benchmark>/ gives one row per model (and the tiny lab's
runs/tiny/eval/<variant>/<benchmark>/seed<S>/ one per variant). With several summaries per cell the cell
shows mean ± std (sample standard deviation over seeds) and the JSON keeps every value. Two summaries that
claim the same (row, benchmark) are refused unless they are distinct seed<S> directories of one cell
directory (two models would otherwise be averaged, their gap shown as seed spread).
The "Avg." column is the mean over benchmarks of a row's cell means (only when the row is complete).
When the summaries hold "truncated" (eval.math's share of samples cut off at --max-new-tokens, which have no
answer), a second table shows it per (row, benchmark) and the JSON cells carry it.
--baseline NAME adds, per other row and benchmark, the paired avg@n difference against NAME with a 95% bootstrap
interval over problems (eval/bootstrap.py: problems resampled, paired by id, the seeds of each problem averaged);
--pairs A-B,C-D the same for chosen rows; JSON: the cell's "delta", a top-level "pairs". Rows whose models came
from train.py runs get a cost table (run_summary.json: train seconds, tokens trained and generated; eval/compare.py).
A PNG bar chart (results.png next to --out) is drawn when matplotlib is installed.

Bad input (cli.py's convention: one line `eval.table: error: ...`, exit status 2, nothing written): a path that
does not exist, no summary.json found, two summaries claiming one cell (not seed<S> directories of it), a summary that is not UTF-8 JSON (file:line) or not an object, one
without --metric or whose --metric is not a number (the message lists the numeric keys it has), an --out or
--json that cannot be written (checked after the inputs; their missing directories are made once all checks pass).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import cli
from eval import compare

SEED_DIR = re.compile(r"seed[-_]?\d+")


class TableError(ValueError):
    """A path or summary file the table cannot be made from (the CLI prints it as one line)."""


def find_summaries(paths) -> list[Path]:
    """summary.json files named by `paths` (files as given, directories searched recursively)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.rglob("summary.json"))
        elif p.is_file():
            found.append(p)
        else:
            raise TableError(f"{p}: no such file or directory (give summary.json files or directories holding them)")
    seen: set[Path] = set()  # a file named twice (as itself and inside a directory) counts once
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


LAYOUT_DIR = "eval"  # runs/<model>/eval/<benchmark>: the row is <model>, not "eval"


def names_of(path: Path) -> tuple[str, str]:
    """(row, benchmark) of a summary path, skipping a seed<S> directory and an `eval` directory."""
    d = _cell_dir(path)
    row = d.parent
    if row.name == LAYOUT_DIR and row.parent.name:
        row = row.parent
    return row.name, d.name


def _cell_dir(path: Path) -> Path:
    """The (row, benchmark) directory of a summary: its parent, or the parent of its seed<S> directory."""
    d = path.parent
    return d.parent if SEED_DIR.fullmatch(d.name) else d


def collect(paths, metric: str, truncated: dict | None = None,
            sources: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """{variant: {benchmark: [metric value per seed]}}, in order of first appearance; `truncated` (when given)
    is filled the same way with the summaries' "truncated" share (samples cut off at --max-new-tokens), and
    `sources` with {(row, benchmark): [its summary.json paths]} (eval/compare.py reads their directories)."""
    cells: dict[str, dict[str, list[float]]] = {}
    claims: dict[tuple[str, str], list[Path]] = {} if sources is None else sources  # (row, benchmark) -> paths
    for path in find_summaries(paths):
        summary = read_summary(path)
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if metric not in numeric:
            what = (f"no metric {metric!r}" if metric not in summary else
                    f"metric {metric!r} is a {type(summary[metric]).__name__}, not a number")
            raise TableError(f"{path}: {what} (--metric: one of {', '.join(numeric) or 'none'})")
        variant, bench = names_of(path)
        _claim(claims.setdefault((variant, bench), []), path, variant, bench)
        cells.setdefault(variant, {}).setdefault(bench, []).append(float(summary[metric]))
        if truncated is not None and isinstance(summary.get("truncated"), (int, float)):
            truncated.setdefault(variant, {}).setdefault(bench, []).append(float(summary["truncated"]))
    if not cells:
        raise TableError(f"no summary.json under {', '.join(map(str, paths))}")
    return cells


def _claim(others: list[Path], path: Path, row: str, bench: str) -> None:
    """Add path to the summaries of cell (row, bench); TableError unless every one of them is a distinct
    seed<S> directory of the same cell directory."""
    for other in others:
        if not (SEED_DIR.fullmatch(path.parent.name) and SEED_DIR.fullmatch(other.parent.name)
                and _cell_dir(path).resolve() == _cell_dir(other).resolve() and path.parent.name != other.parent.name):
            raise TableError(f"{other} and {path} both claim row {row!r}, benchmark {bench!r} (only seed<S> "
                             "directories of one cell are averaged); give the runs distinct directory names "
                             "(runs/<model>/eval/<benchmark>) or tabulate them separately")
    others.append(path)


def read_summary(path: Path) -> dict:
    """A summary.json as a dict; TableError naming the file (and line) when it is not a UTF-8 JSON object."""
    raw = path.read_bytes()
    try:
        summary = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TableError(f"{path}:{line}: not UTF-8 (a summary.json of eval.math is UTF-8 JSON)") from None
    except json.JSONDecodeError as e:
        raise TableError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(summary, dict):
        raise TableError(f"{path}: expected a JSON object (an eval.math summary), got {type(summary).__name__}")
    return summary


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


def make_table(cells: dict[str, dict[str, list[float]]], metric: str,
               truncated: dict[str, dict[str, list[float]]] | None = None) -> tuple[str, dict]:
    """Markdown table text and its JSON form {variant: {benchmark: cell_stats, "Avg.": ...}}. With `truncated`
    (collect's), each cell's JSON gets "truncated" (mean share over seeds, %) and a second table shows it."""
    benches: list[str] = []
    for row in cells.values():
        benches += [b for b in row if b not in benches]
    stats = {v: {b: cell_stats(row[b]) for b in benches if b in row} for v, row in cells.items()}
    with_avg = len(benches) > 1
    header = ["Model"] + benches + (["Avg."] if with_avg else [])
    rule = lambda cols: "|" + "|".join([" --- "] + [" ---: "] * (cols - 1)) + "|"
    lines = [f"{metric} (%)", "", "| " + " | ".join(header) + " |", rule(len(header))]
    for variant, row in stats.items():
        cols = [_fmt(row.get(b)) for b in benches]
        if with_avg:
            if len(row) == len(benches):
                row["Avg."] = {"mean": statistics.fmean(row[b]["mean"] for b in benches)}  # of the means
            cols.append(_fmt(row.get("Avg.")))
        lines.append("| " + " | ".join([variant] + cols) + " |")
    if truncated:
        lines += ["", "truncated (% of samples cut off at --max-new-tokens)", "",
                  "| " + " | ".join(["Model"] + benches) + " |", rule(len(benches) + 1)]
        for variant, row in stats.items():
            for b in truncated.get(variant, {}):
                row[b]["truncated"] = statistics.fmean(truncated[variant][b])
            lines.append("| " + " | ".join([variant] + [f"{row[b]['truncated']:.1f}" if "truncated" in row.get(b, {})
                                                        else "–" for b in benches]) + " |")
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


def add_comparisons(table: str, stats: dict, sources: dict, a) -> tuple[str, dict]:
    """The table with the --baseline / --pairs intervals and the cost table appended, and the JSON document:
    stats plus each compared cell's "delta", each costed row's "cost" and, with --pairs, a top-level "pairs"."""
    rows = list(stats)
    benches = [b for b in dict.fromkeys(b for row in stats.values() for b in row) if b != "Avg."]
    if a.resamples < 100:
        raise TableError(f"--resamples {a.resamples}: use at least 100")
    if a.baseline is not None and a.baseline not in rows:
        raise TableError(f"--baseline {a.baseline!r}: not a row of the table (rows: {', '.join(rows)})")
    pairs = compare.parse_pairs(a.pairs, rows) if a.pairs else []
    doc = {row: {b: dict(cell) for b, cell in cells.items()} for row, cells in stats.items()}
    lines = [table.rstrip("\n")]
    kw = dict(resamples=a.resamples, seed=a.bootstrap_seed)
    if a.baseline is not None:
        vs = compare.deltas(sources, [(r, a.baseline) for r in rows if r != a.baseline], **kw)
        for (row, _), cells in vs.items():
            for bench, d in cells.items():
                doc[row][bench]["delta"] = d
        lines += compare.delta_table(vs, benches, f"avg@n − {a.baseline} (points; paired by problem, 95% "
                                     f"bootstrap interval over problems, {a.resamples:,} resamples)")
    if pairs:
        chosen = compare.deltas(sources, pairs, **kw)
        doc["pairs"] = {f"{x}-{y}": cells for (x, y), cells in chosen.items()}
        lines += compare.delta_table(chosen, benches, "avg@n differences of chosen rows (points, 95% bootstrap "
                                     "interval over problems)")
    costs = compare.row_costs(sources)
    if costs:
        for row, c in costs.items():
            doc[row]["cost"] = c
        lines += compare.cost_table(costs, rows)
    return "\n".join(lines) + "\n", doc


def main(argv=None) -> str:
    ap = cli.ArgumentParser(prog="eval.table", description="Markdown table (and bar chart) from eval.math summaries.")
    ap.add_argument("paths", nargs="+", help="summary.json files or directories holding them")
    ap.add_argument("--out", required=True, help="Markdown output (the chart goes next to it as .png)")
    ap.add_argument("--json", help="also write the table's numbers as JSON")
    ap.add_argument("--metric", default="avg@n", help="summary key to tabulate: avg@n, maj@n, pass@1, ...")
    ap.add_argument("--baseline", help="row to compare every other row with: paired avg@n difference, 95%% "
                                       "bootstrap interval over problems (eval/bootstrap.py)")
    ap.add_argument("--pairs", help="comparisons of chosen rows, A-B,C-D (A minus B)")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10,000)")
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    a = ap.parse_args(argv)
    truncated, sources = {}, {}
    try:  # the inputs first: a missing run is the error a user needs before an output directory
        cells = collect(a.paths, a.metric, truncated, sources)
        table, stats = make_table(cells, a.metric, truncated)
        table, doc = add_comparisons(table, stats, sources, a)
    except (TableError, compare.CompareError) as e:
        cli.fail("eval.table", e)
    for flag, path in (("--out", a.out), ("--json", a.json)):
        why = path and cli.unwritable(path, parents=True)
        if why:
            cli.fail("eval.table", f"{flag} {path}: cannot be written: {why}")
    out = Path(a.out)
    for path in (a.out, a.json):  # every check passed: make the outputs' directories
        if path:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table, end="")
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    png = out.with_suffix(".png")
    if bar_chart(stats, a.metric, png):
        print(f"bar chart: {png}")
    else:
        print("bar chart skipped: matplotlib is not installed (pip install matplotlib)")
    return table


if __name__ == "__main__":
    main()
