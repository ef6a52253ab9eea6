"""Training curves from runs' metrics.jsonl: one panel per metric, runs overlaid, validation points marked.

    python -m eval.plot runs/tiny/bias05/seed0 runs/tiny/sft/seed0 --out curves.png
    python -m eval.plot runs/tiny/*/seed* --out curves.png --metrics loss,policy/kl_mean,val/avg@n

A run is a directory holding metrics.jsonl (train.py's output_dir). Its label is the directory name, or
<parent>/<seedN> for a seed directory; runs whose labels differ only in the seed share a colour and one legend
entry. Training metrics are lines over optimizer steps; val/ metrics (one row per validation) are lines with
markers. By default the panels are DEFAULT_METRICS that at least one run logged.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import cli

DEFAULT_METRICS = ("loss", "grad_norm", "policy/kl_mean", "policy/entropy", "data/reward_mean", "val/avg@n")
SEED = re.compile(r"seed[-_]?\d+")


class PlotError(Exception):
    """Bad input to eval.plot, reported as one line."""


def read_run(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl; PlotError naming file:line for a malformed one."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (not a train.py output_dir?)")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PlotError(f"{path}:{i}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict) or "step" not in row:
                    raise PlotError(f"{path}:{i}: a metrics row needs a 'step'")
                rows.append(row)
        except UnicodeDecodeError:
            raise PlotError(f"{path}: not UTF-8 text") from None
    return rows


def labels_of(run_dirs: list[Path]) -> list[tuple[str, str]]:
    """(group, label) per run: group without the seed (one colour), label with it."""
    out = []
    for d in run_dirs:
        d = d.resolve()
        if SEED.fullmatch(d.name):
            out.append((d.parent.name, f"{d.parent.name}/{d.name}"))
        else:
            out.append((d.name, d.name))
    return out


def series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in row order, skipping rows without it."""
    pts = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def plot(runs: dict[Path, list[dict]], metrics: list[str]):
    """A matplotlib Figure with one panel (Axes) per metric, every run overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    groups = labels_of(list(runs))
    colours = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(g for g, _ in groups))}
    for ax, metric in zip(axes.flat, metrics):
        seen = set()
        for (group, _), rows in zip(groups, runs.values()):
            steps, values = series(rows, metric)
            if not steps:
                continue
            style = dict(marker="o", markersize=4) if metric.startswith("val/") else dict(linewidth=1.0)
            ax.plot(steps, values, color=colours[group], alpha=0.85, label=None if group in seen else group,
                    **style)
            seen.add(group)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        fig.delaxes(ax)
    handles, names = [], []
    for ax in fig.axes:  # one legend for the figure: every group once
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def main(argv=None) -> None:
    ap = cli.ArgumentParser(prog="eval.plot", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (train.py output_dir) holding metrics.jsonl")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--metrics", help=f"comma-separated metrics keys (default: those of {', '.join(DEFAULT_METRICS)} "
                                      "that a run logged)")
    a = ap.parse_args(argv)
    try:
        if not a.out.endswith(".png"):
            raise PlotError(f"--out {a.out}: must name a .png file")
        runs = {}
        for r in map(Path, a.runs):
            if not r.is_dir():
                raise PlotError(f"{r}: no such run directory")
            runs[r] = read_run(r)
        why = cli.unwritable(a.out, parents=True)  # after the inputs: the error a user needs first
        if why:
            raise PlotError(f"--out {a.out}: cannot be written: {why}")
        logged = {k for rows in runs.values() for row in rows for k, v in row.items() if isinstance(v, (int, float))}
        if a.metrics:
            metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
            missing = [m for m in metrics if m not in logged]
            if missing or not metrics:
                raise PlotError(f"--metrics: {', '.join(missing) or '(none)'} not in any run; logged: "
                                f"{', '.join(sorted(logged - {'step'}))}")
        else:
            metrics = [m for m in DEFAULT_METRICS if m in logged]
            if not metrics:
                raise PlotError(f"none of {', '.join(DEFAULT_METRICS)} in the runs' metrics.jsonl")
    except PlotError as e:
        cli.fail("eval.plot", e)
    fig = plot(runs, metrics)
    Path(a.out).resolve().parent.mkdir(parents=True, exist_ok=True)  # every check passed: make --out's directory
    tmp = a.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    Path(tmp).replace(a.out)
    print(f"wrote {a.out}: {len(metrics)} panels, {len(runs)} runs")


if __name__ == "__main__":
    main()
