"""Seconds per optimizer step of DPO (two passes, dpo.py) against off-policy GRPO on the same data, as ratios.

    python synthetic.py --out data/tiny
    python curate.py --input data/tiny/teacher_raw.jsonl --output data/tiny/teacher.jsonl
    python benchmarks/dpo_step.py [--steps 30 --nproc 2 --micro-batch-sizes 8 1]

Runs train.py under torchrun (2 CPU ranks, as the tiny lab does) on configs/tiny/offgrpo.yaml and
configs/tiny/dpo.yaml, both from a fresh model of the base's shape (model.init_config: the speed does not depend on
the weights) and the cached reference, at each micro-batch size (the real configs use 1). The median of
metrics.jsonl's per-step seconds is taken, leaving out the first two steps. DPO runs a no-grad forward and a forward
+ backward of each paired row and skips the rows of pairless groups (data/pairless_share); offgrpo runs one forward
+ backward of every row.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402


def run(config: str, out: str, overrides: list[str], nproc: int) -> dict:
    """Median seconds per step, mean micro-batches per step and mean pairless share of a train.py run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           config, f"output_dir={out}", "validation.every_epochs=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dpo_step.py: error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    return {"seconds": statistics.median(r["seconds"] for r in rows[2:]),
            "micro_batches": statistics.mean(r["perf/micro_batches"] for r in rows),
            "pairless": statistics.mean(r["data/pairless_share"] for r in rows) if "data/pairless_share" in rows[0]
            else None}


def main(argv=None):
    ap = cli.ArgumentParser(prog="dpo_step.py", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--nproc", type=int, default=2, help="ranks")
    ap.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 1], help="train.micro_batch_size values")
    a = ap.parse_args(argv)
    if a.steps < 3 or a.nproc < 1 or min(a.micro_batch_sizes) < 1:
        cli.fail("dpo_step.py", f"--steps {a.steps} --nproc {a.nproc}: need --steps >= 3, --nproc >= 1 and "
                 "--micro-batch-sizes >= 1")
    for need in ("data/tiny/teacher.jsonl", "data/tiny/tokenizer"):
        if not os.path.exists(os.path.join(ROOT, need)):
            cli.fail("dpo_step.py", f"{need} not found; make the tiny data first (see this file's docstring)")
    with open(os.path.join(ROOT, "configs/tiny/base.yaml")) as f:
        init = yaml.safe_load(f)["model"]["init_config"]
    fresh = ["model.path=null", f"model.init_config={json.dumps(init)}", "model.tokenizer=data/tiny/tokenizer",
             f"train.max_steps={a.steps}"]
    print(f"{a.nproc} ranks, {a.steps} steps per run; seconds per step (median), micro-batches per rank and step")
    with tempfile.TemporaryDirectory() as tmp:
        for mbs in a.micro_batch_sizes:
            over = fresh + [f"train.micro_batch_size={mbs}"]
            grpo = run("configs/tiny/offgrpo.yaml", os.path.join(tmp, f"grpo{mbs}"), over, a.nproc)
            dpo = run("configs/tiny/dpo.yaml", os.path.join(tmp, f"dpo{mbs}"), over, a.nproc)
            print(f"micro_batch_size {mbs}: offgrpo {grpo['seconds']:.3f} s ({grpo['micro_batches']:.2f} mb), "
                  f"dpo {dpo['seconds']:.3f} s ({dpo['micro_batches']:.2f} mb, each twice; pairless share "
                  f"{dpo['pairless']:.2f}): dpo / offgrpo = {dpo['seconds'] / grpo['seconds']:.2f}")


if __name__ == "__main__":
    main()
