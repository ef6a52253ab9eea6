"""eval.table --baseline / --pairs (paired avg@n differences with bootstrap intervals) and the cost table, through
the real CLI on the tiny lab's layout (runs/tiny/eval/<row>/<benchmark>/seed<S>/) with hand-made samples."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.bootstrap import paired_delta

ROOT = Path(__file__).resolve().parents[1]

# row -> seed -> problem -> correct flags of its 4 samples
RESULTS = {
    "base": {0: {"p1": [1, 0, 0, 0], "p2": [0, 0, 0, 0], "p3": [1, 1, 0, 0]},
             1: {"p1": [0, 0, 0, 0], "p2": [1, 0, 0, 0], "p3": [1, 1, 1, 0]}},
    "bias05": {0: {"p1": [1, 1, 1, 0], "p2": [1, 0, 0, 0], "p3": [1, 1, 1, 1]},
               1: {"p1": [1, 1, 0, 0], "p2": [0, 0, 0, 0], "p3": [1, 1, 1, 0]}},
    "sft": {0: {"p1": [1, 1, 0, 0], "p2": [1, 1, 0, 0], "p3": [1, 0, 0, 0]},
            1: {"p1": [1, 0, 0, 0], "p2": [1, 1, 1, 0], "p3": [1, 1, 0, 0]}},
}
COST = {"base": [100.0, 120.0], "bias05": [30.0, 34.0]}  # sft: no run_summary.json (a downloaded model)


def lab(root: Path) -> Path:
    for row, seeds in RESULTS.items():
        for seed, problems in seeds.items():
            run = root / row / f"seed{seed}"
            model = run / "hf" / "best"
            model.mkdir(parents=True)
            if row in COST:
                (run / "run_summary.json").write_text(json.dumps(
                    {"train_seconds": COST[row][seed], "tokens_trained": 1000 * (seed + 1),
                     "tokens_generated_rollout": 0, "tokens_generated_validation": 10 * (seed + 1), "steps": 4}))
            d = root / "eval" / row / "aime" / f"seed{seed}"
            d.mkdir(parents=True)
            samples = [{"id": p, "sample": i, "correct": bool(c)} for p, cs in problems.items() for i, c in enumerate(cs)]
            (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            avg = 100 * np.mean([np.mean(cs) for cs in problems.values()])
            (d / "summary.json").write_text(json.dumps({"avg@n": avg, "n": 4}))
            (d / "settings.json").write_text(json.dumps({"model": str(model)}))
    return root / "eval"


def table(*args):
    return subprocess.run([sys.executable, "-m", "eval.table", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def scores(row):
    return {p: np.mean([np.mean(RESULTS[row][s][p]) for s in RESULTS[row]]) for p in ("p1", "p2", "p3")}


def test_baseline_pairs_and_cost(tmp_path):
    runs = lab(tmp_path)
    out, js = tmp_path / "r" / "t.md", tmp_path / "r" / "t.json"
    proc = table(runs, "--out", out, "--json", js, "--baseline", "base", "--pairs", "bias05-sft",
                 "--resamples", "5000", "--bootstrap-seed", "7")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(js.read_text())
    for row in ("bias05", "sft"):  # hand computation: seeds averaged per problem, then the paired mean
        want = 100 * np.mean([scores(row)[p] - scores("base")[p] for p in ("p1", "p2", "p3")])
        d = doc[row]["aime"]["delta"]
        assert d["mean"] == pytest.approx(want) and d["baseline"] == "base" and d["problems"] == 3
        assert d == {"baseline": "base", **paired_delta(scores(row), scores("base"), resamples=5000, seed=7)}
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert "delta" not in doc["base"]["aime"]
    pair = doc["pairs"]["bias05-sft"]["aime"]
    assert pair["baseline"] == "sft" and pair["mean"] == pytest.approx(
        100 * np.mean([scores("bias05")[p] - scores("sft")[p] for p in ("p1", "p2", "p3")]))
    assert doc["base"]["cost"]["train_seconds"] == 110.0 and doc["bias05"]["cost"]["tokens_trained"] == 1500
    assert doc["base"]["cost"]["runs"] == 2 and "cost" not in doc["sft"]
    text = out.read_text()
    d = doc["bias05"]["aime"]["delta"]
    assert f"| bias05 − base | {d['mean']:+.1f} [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}] |" in text
    assert "| bias05 | 32 | 1,500 | 0 | 15 |" in text and "| sft | – | – | – | – |" in text


@pytest.mark.parametrize("extra, message", [
    (["--baseline", "nope"], "--baseline 'nope': not a row of the table (rows: base, bias05, sft)"),
    (["--pairs", "bias05-nope"], "--pairs 'bias05-nope': expected A-B"),
    (["--pairs", "bias05-bias05"], "--pairs 'bias05-bias05'"),
    (["--baseline", "base", "--resamples", "10"], "--resamples 10: use at least 100"),
])
def test_bad_comparisons_are_one_line_and_write_nothing(tmp_path, extra, message):
    runs = lab(tmp_path)
    proc = table(runs, "--out", tmp_path / "o" / "t.md", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_samples_are_named(tmp_path):
    runs = lab(tmp_path)
    (runs / "sft" / "aime" / "seed1" / "samples.jsonl").unlink()
    proc = table(runs, "--out", tmp_path / "t.md", "--baseline", "base")
    assert proc.returncode == 2 and "sft/aime/seed1/samples.jsonl: missing" in proc.stderr
