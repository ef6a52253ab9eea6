"""eval.math --data-parallel N: N processes (one engine each, on its own GPUs) over disjoint shards of the
(problem, sample) pairs, merged into the samples.jsonl / summary.json / settings.json one process writes.

Shard i of N holds the samples s = i, i + N, ... of every problem (eval.math --shard i/N), in <out>/shards/<i>/
(resumable there as any --out is); its process sees GPUs i*T .. i*T+T-1 (CUDA_VISIBLE_DEVICES; T =
--tensor-parallel-size) and logs to <out>/shards/<i>.log. When every shard is done, each --out gets the union:
every (problem, sample) exactly once (checked), in the records' order, its summary eval.metrics.summarize of
them and the settings of an unsharded run, so a later run without --data-parallel finds it finished.

Results do not depend on N where each sample is seeded alone: vLLM seeds every request by (seed, problem id,
sample) and greedy decoding is deterministic. HF sampling seeds a generate() call once, and a shard's batches hold
other samples than one process's, so sampled HF texts differ with N (the same distribution, other draws).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cli
from eval.metrics import summarize


def check(a) -> tuple[int, int]:
    """--data-parallel / --tensor-parallel-size / --shard checks; the shard as (i, N), (0, 1) when unsharded."""
    if a.data_parallel < 1 or a.tensor_parallel_size < 1:
        cli.fail("eval.math", f"--data-parallel {a.data_parallel} / --tensor-parallel-size {a.tensor_parallel_size}: "
                 "must be >= 1")
    if a.tensor_parallel_size > 1 and a.backend != "vllm":
        cli.fail("eval.math", "--tensor-parallel-size needs --backend vllm")
    if a.shard is None:
        shard = (0, 1)
    else:
        i, _, n = a.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)) or a.data_parallel > 1:
            cli.fail("eval.math", f"--shard {a.shard!r}: expected I/N with 0 <= I < N, without --data-parallel")
        shard = (int(i), int(n))
    if a.n >= 1 and max(shard[1], a.data_parallel) > a.n:  # (--n < 1: _check_inputs names it)
        cli.fail("eval.math", f"--n {a.n}: fewer samples per problem than shards ({max(shard[1], a.data_parallel)})")
    return shard


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def shard_argv(argv: list[str], outs: list[str], i: int, n: int) -> list[str]:
    """argv without --data-parallel and with --out OUT/shards/<i> ... and --shard i/n."""
    out, skip = [], 0
    for k, arg in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if arg in ("--data-parallel", "--out") or arg.startswith(("--data-parallel=", "--out=")):
            if arg == "--data-parallel":
                skip = 1
            elif arg == "--out":  # (nargs="+": every value up to the next option)
                skip = next((j for j, x in enumerate(argv[k + 1:]) if x.startswith("--")), len(argv) - k - 1)
            continue
        out.append(arg)
    return out + ["--out", *[str(Path(o) / "shards" / str(i)) for o in outs], "--shard", f"{i}/{n}"]


def run(argv: list[str], a, records: list[dict]) -> list[dict]:
    """Start the N shard processes, wait for all, merge each --out (module docstring)."""
    n, tp = a.data_parallel, a.tensor_parallel_size
    gpus = _visible_gpus()
    if gpus and len(gpus) < n * tp:
        cli.fail("eval.math", f"--data-parallel {n} x --tensor-parallel-size {tp} needs {n * tp} GPUs, "
                 f"{len(gpus)} visible")
    for out in a.out:
        (Path(out) / "shards").mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * tp:(i + 1) * tp])
        log = open(Path(a.out[0]) / "shards" / f"{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "eval.math", *shard_argv(argv, a.out, i, n)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
    print(f"eval: {n} shard processes ({', '.join('GPUs ' + ','.join(gpus[i * tp:(i + 1) * tp]) for i in range(n)) if gpus else 'CPU'}), "
          f"logs in {Path(a.out[0]) / 'shards'}", flush=True)
    failed = []
    for i, (p, log) in enumerate(procs):
        if p.wait() != 0:
            failed.append(f"shard {i} (exit {p.returncode}; log {log.name})")
        log.close()
    if failed:
        cli.fail("eval.math", f"{', '.join(failed)} failed; re-run the same command to resume the shards")
    return [merge(Path(out), n, records, a.n) for out in a.out]


def merge(out: Path, n_shards: int, records: list[dict], n: int) -> dict:
    """The shards' samples as one samples.jsonl (every (problem, sample) once), summary.json, settings.json."""
    ids = {r["id"] for r in records}
    by_key, settings = {}, None
    for i in range(n_shards):
        d = out / "shards" / str(i)
        with open(d / "samples.jsonl") as f:
            for line in f:
                if line.strip():
                    s = json.loads(line)
                    if s["id"] in ids:
                        key = (s["id"], s["sample"])
                        if key in by_key or s["sample"] % n_shards != i:
                            raise SystemExit(f"eval.math: error: {d}: sample {key} belongs to another shard "
                                             "or is there twice")
                        by_key[key] = s
        shard_settings = json.loads((d / "settings.json").read_text())
        shard_settings.pop("shard")
        settings = settings or shard_settings
    missing = [(r["id"], j) for r in records for j in range(n) if (r["id"], j) not in by_key]
    if missing:
        raise SystemExit(f"eval.math: error: {out}: {len(missing)} samples missing after the shards finished, "
                         f"first {missing[0]}")
    samples = [by_key[r["id"], j] for r in records for j in range(n)]
    for name, text in (("samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples)),
                       ("settings.json", json.dumps(settings, indent=1) + "\n"),
                       ("summary.json", json.dumps(summary := summarize(samples), indent=1) + "\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    print(json.dumps({k: v for k, v in summary.items() if k != "by_k"}), flush=True)
    return summary
