"""eval.plot: the PNG decodes, one panel per metric, every run's points drawn as logged; bad input is one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from eval import plot as eval_plot  # noqa: E402


def write_run(d: Path, steps: int, scale: float, val_every: int):
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": scale / s, "grad_norm": 1.0 + s, "policy/kl_mean": 0.01 * s, "finite": True})
        if s % val_every == 0:
            rows.append({"step": s, "val/epoch": s // val_every, "val/avg@n": 10.0 * s * scale})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture
def runs(tmp_path):
    spec = {"bias05/seed0": (6, 1.0, 3), "bias05/seed1": (6, 2.0, 3), "sft": (4, 3.0, 2)}
    return {tmp_path / name: write_run(tmp_path / name, *args) for name, args in spec.items()}


def run_plot(*args):
    return subprocess.run([sys.executable, "-m", "eval.plot", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_png_decodes_with_one_panel_per_metric(runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "curves.png"
    proc = run_plot(*runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    png = matplotlib.image.imread(out)
    assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 400
    assert "4 panels, 3 runs" in proc.stdout  # loss, grad_norm, policy/kl_mean, val/avg@n (defaults present)

    fig = eval_plot.plot({d: eval_plot.read_run(d) for d in runs}, ["loss", "val/avg@n"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "val/avg@n"]
    for ax, metric in zip(fig.axes, ["loss", "val/avg@n"]):
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == metric
        lines = ax.get_lines()
        assert len(lines) == 3  # every run overlaid
        for line, rows in zip(lines, runs.values()):
            want = [(r["step"], r[metric]) for r in rows if metric in r]
            assert [tuple(p) for p in line.get_xydata()] == want
        assert (lines[0].get_marker() == "o") == metric.startswith("val/")  # validation points marked
        assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()  # seeds share a colour
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["bias05", "sft"]


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path):
    run = next(iter(runs))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n')
    cases = [((tmp_path / "nope", "--out", tmp_path / "a.png"), "nope: no such run directory"),
             ((tmp_path, "--out", tmp_path / "a.png"), "no metrics.jsonl"),
             ((bad, "--out", tmp_path / "a.png"), "metrics.jsonl:2: malformed JSON"),
             ((run, "--out", tmp_path / "a.png", "--metrics", "loss,val/avg@m"), "val/avg@m not in any run"),
             ((run, "--out", tmp_path / "a.pdf"), "must name a .png file"),
             ((tmp_path / "nope", "--out", tmp_path / "no" / "a.png"), "nope: no such run directory")]
    for args, message in cases:
        proc = run_plot(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("eval.plot: error: ") and message in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.pdf"))
    assert not (tmp_path / "no").exists()  # a refused run makes no --out directory


def test_out_directory_is_made_after_the_checks(runs, tmp_path):
    """Like eval.math, eval.plot makes the directory of --out (issue 28.3), once every input passed."""
    out = tmp_path / "results" / "curves" / "a.png"
    proc = run_plot(*runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
