"""Seconds per optimizer step of padded vs packed micro-batches (train.micro_batch_tokens), in one run, as ratios.

    python synthetic.py --out data/tiny
    python curate.py --input data/tiny/teacher_raw.jsonl --output data/tiny/teacher.jsonl
    python benchmarks/packing.py [--tokens 512 1024 2048 --steps 30 --nproc 2]

Runs train.py under torchrun (2 CPU ranks, as the tiny lab does) on configs/tiny/base.yaml (SFT) and
configs/tiny/bias05.yaml (off-policy GRPO, cached reference). bias05 starts from a fresh model of the base's
shape (model.init_config) so that no trained base is needed: the speed does not depend on the weights. Each
config runs padded (its micro_batch_size) and packed at each --tokens budget per micro-batch. The median of
metrics.jsonl's per-step seconds is taken, leaving out the first two steps. A packed row is one sequence of up to
--tokens positions whose attention transformers masks per sequence from position_ids (sdpa on CPU: a dense
block-diagonal [T, T] mask), so its attention costs T^2 where padded rows cost B x L^2.
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


def seconds_per_step(config: str, out: str, overrides: list[str], nproc: int) -> tuple[float, float]:
    """(median seconds per step, mean micro-batches per step) of a train.py run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           config, f"output_dir={out}", "validation.every_epochs=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"packing.py: error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    return (statistics.median(r["seconds"] for r in rows[2:]),
            statistics.mean(r["perf/micro_batches"] for r in rows))


def main(argv=None):
    ap = cli.ArgumentParser(prog="packing.py", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048],
                    help="train.micro_batch_tokens of the packed runs (one run each)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--nproc", type=int, default=2, help="ranks")
    a = ap.parse_args(argv)
    if min(a.tokens) < 1 or a.steps < 3 or a.nproc < 1:
        cli.fail("packing.py", f"--tokens {' '.join(map(str, a.tokens))} --steps {a.steps} --nproc {a.nproc}: "
                 "need --tokens >= 1, --steps >= 3 and --nproc >= 1")
    for need in ("data/tiny/mid.jsonl", "data/tiny/teacher.jsonl", "data/tiny/tokenizer"):
        if not os.path.exists(os.path.join(ROOT, need)):
            cli.fail("packing.py", f"{need} not found; make the tiny data first (see this file's docstring)")
    with open(os.path.join(ROOT, "configs/tiny/base.yaml")) as f:
        init = yaml.safe_load(f)["model"]["init_config"]
    fresh = ["model.path=null", f"model.init_config={json.dumps(init)}", "model.tokenizer=data/tiny/tokenizer"]
    cases = {"tiny base (SFT)": ("configs/tiny/base.yaml", []), "tiny bias05": ("configs/tiny/bias05.yaml", fresh)}
    print(f"{a.nproc} ranks, {a.steps} steps per run; seconds per step (median), micro-batches per rank and step")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, extra) in cases.items():
            common = [f"train.max_steps={a.steps}", "train.save_every=100000", *extra]
            tag = name.split()[1]
            padded = seconds_per_step(config, os.path.join(tmp, tag + "-padded"), common, a.nproc)
            print(f"{name:16s} padded               {padded[0]:.3f} s/step ({padded[1]:.1f} micro-batches)", flush=True)
            for tokens in a.tokens:
                packed = seconds_per_step(config, os.path.join(tmp, f"{tag}-packed{tokens}"),
                                          common + [f"train.micro_batch_tokens={tokens}"], a.nproc)
                print(f"{name:16s} packed {tokens:5d} tokens {packed[0]:.3f} s/step ({packed[1]:.1f} micro-batches): "
                      f"packed / padded speed {padded[0] / packed[0]:.2f}x", flush=True)

if __name__ == "__main__":
    main()
