"""launch/sweep.sh and its grid (launch/sweep_grid.py): the grid's points in order, each checked against the
config before anything runs; bad input is one line, exit 2, nothing written. The lab scripts parse (bash -n)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import sweep_grid  # noqa: E402


def test_grid_points_are_the_product_in_order_and_checked_against_the_config():
    proc = subprocess.run([sys.executable, "launch/sweep_grid.py", "g", "configs/tiny/bias05.yaml", "2",
                           "loss.all_positive_bias=0,0.5", "loss.clip_eps=0.2,0.3", "--", "train.max_steps=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert rows == [[f"loss.all_positive_bias={b},loss.clip_eps={c}", f"loss.all_positive_bias={b} loss.clip_eps={c}"]
                    for b in ("0", "0.5") for c in ("0.2", "0.3")]


@pytest.mark.parametrize("args, message", [
    (["b", "configs/tiny/bias05.yaml", "loss.all_positve_bias=0,0.1"], "unknown key 'loss.all_positve_bias'"),
    (["b", "configs/tiny/bias05.yaml", "loss.all_positive_bias=0,x"], "expected float, got 'x'"),
    (["b", "configs/tiny/bias05.yaml", "loss.all_positive_bias=0,,1"], "expected key=v1,v2"),
    (["b", "configs/tiny/bias05.yaml", "loss.all_positive_bias"], "expected key=v1,v2"),
    (["b", "configs/tiny/bias05.yaml", "loss.all_positive_bias=0,0"], "a value is repeated"),
    (["b", "configs/tiny/bias05.yaml", "loss.kl_coef=0", "loss.kl_coef=1"], "grid key loss.kl_coef given twice"),
    (["b", "configs/tiny/nope.yaml", "loss.kl_coef=0"], "CONFIG configs/tiny/nope.yaml: no such file"),
    (["a/b", "configs/tiny/bias05.yaml", "loss.kl_coef=0"], "NAME 'a/b'"),
    (["b", "configs/tiny/bias05.yaml", "loss.kl_coef=0", "--seeds", "0"], "--seeds '0': must be an integer >= 1"),
    (["b", "configs/tiny/bias05.yaml", "loss.kl_coef=0", "--", "train.nope=1"], "unknown key 'train.nope'"),
    (["b", "configs/tiny/bias05.yaml"], "usage: bash launch/sweep.sh"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(args, message):
    watched = [ROOT / "runs" / "tiny" / "sweeps" / "b", ROOT / "data" / "tiny"]
    before = [(p.exists(), p.stat().st_mtime_ns if p.exists() else None) for p in watched]
    proc = subprocess.run(["bash", "launch/sweep.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("sweep.sh: error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert [(p.exists(), p.stat().st_mtime_ns if p.exists() else None) for p in watched] == before


def test_parse_grid_names_what_is_wrong():
    with pytest.raises(ValueError, match="no grid"):
        sweep_grid.parse_grid([])
    assert sweep_grid.points(sweep_grid.parse_grid(["a=1,2", "b=x"])) == [["a=1", "b=x"], ["a=2", "b=x"]]


@pytest.mark.parametrize("script", ["launch/lab.sh", "launch/demo.sh", "launch/sweep.sh"])
def test_lab_scripts_parse(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
