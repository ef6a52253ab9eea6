"""triton_logprob's kernels compile for real GPUs, fit their shared memory and use the MMAs meant, checked without a GPU.

tests/_triton_aot_worker.py compiles, ahead of time, every kernel specialization the launchers can produce (the
split forward and the logit-gradient kernel, each with and without entropy, for every autotuning candidate of
tiles_for; aligned shapes, plus unaligned ones for the default candidate) for sm_80, sm_89 and sm_90 in bf16,
fp16 and fp32: 60 compiles, about 3 s each (triton 3.9). It runs in its own processes with TRITON_INTERPRET
removed from the environment (this suite sets it for the interpreter tests) and a fresh triton cache.
The test fails on a compile error, on shared memory per block over the architecture's limit (a kernel that would
fail at its first launch), on any atomic instruction (the backward is meant to be deterministic), on a 16-bit
sm_90 kernel that does not lower to wgmma of its own dtype (bf16 -> wgmma bf16, not tf32 on upcast tiles), on an
sm_8x one without mma.sync of its dtype, and on any aligned 16-bit kernel that spills registers (unaligned
launches, element-wise loads, spill up to ~0.8 KB per thread: reported, not asserted). It prints
shared memory, registers, spills and MMA kinds per kernel (pytest -s; the table is in the README).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

WORKER = Path(__file__).with_name("_triton_aot_worker.py")


def compile_all(cache_dir):
    """Rows from the worker, run as parallel shards (compiling is single-threaded per process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # cold compiles; nothing written to ~/.triton
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, which also warns when it is unset
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shards = max(1, min(4, cpus))
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--shard", str(i), "--of", str(shards)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    rows, done = [], 0
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{err[-4000:]}"
        for line in out.splitlines():
            row = json.loads(line)
            if "done" in row:
                done += 1
                assert row["done"] == row["of"], row
            else:
                rows.append(row)
    assert done == shards
    return rows


def name(r):
    ent = "entropy" if r["entropy"] else "-"
    return (f"sm_{r['arch']} {r['dtype']} {r['kernel']} {ent} #{r['candidate']} "
            f"{'aligned' if r['aligned'] else 'unaligned'}")


def table(rows):
    head = "| kernel | BN x BV x BH, warps, stages | shared B / limit | regs | spill st/ld B | MMA |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = (lambda r: (r["arch"], r["dtype"], r["kernel"], not r["aligned"], r["candidate"], not r["entropy"]))
    for r in sorted(rows, key=order):
        t = r["tiles"]
        tiles = f"{t['block_n']}x{t['block_v']}x{t['block_h']}, {t['num_warps']}, {t['num_stages']}"
        usage = "ERROR | | | " if "error" in r else (
            f"{r['shared']:,} / {r['smem_limit']:,} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{', '.join(r['mma']) or 'FMA'}")
        lines.append(f"| {name(r)} | {tiles} | {usage} |")
    return "\n".join(lines)


def test_kernels_compile_for_sm80_sm89_sm90_fit_and_use_native_mma(tmp_path):
    rows = compile_all(tmp_path / "triton-cache")
    print("\n" + table(rows))
    assert {r["arch"] for r in rows} == {80, 89, 90} and {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert {r["kernel"] for r in rows} == {"fwd", "dz"}
    errors = [f"{name(r)}:\n{r['error']}" for r in rows if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    over = [f"{name(r)} {r['tiles']}: {r['shared']:,} B > "
            f"{r['smem_limit']:,} B" for r in rows if r["shared"] > r["smem_limit"]]
    assert not over, "shared memory over the per-block limit (the launch would fail):\n" + "\n".join(over)
    assert all(r["registers"] is not None for r in rows), "ptxas -v printed no register count"
    atomics = [name(r) for r in rows if r["atomics"]]
    assert not atomics, f"atomic instructions (a nondeterministic backward): {atomics}"
    for r in rows:
        if r["dtype"] == "fp32":
            continue
        ptx_type = {"bf16": "bf16", "fp16": "f16"}[r["dtype"]]
        want = f"wgmma {ptx_type}" if r["arch"] == 90 else f"mma.sync {ptx_type}"
        assert r["mma"] == [want], f"{name(r)} lowers to {r['mma']}, not {want}"
        if r["aligned"]:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name(r)} spills: {r}"
