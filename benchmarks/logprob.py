"""Peak extra memory and time of forward+backward: fused_logprobs vs naive full-logits log_softmax + gather.

    python benchmarks/logprob.py                      # N=4096, H=512, V=151,936 (Qwen2 vocabulary)
    python benchmarks/logprob.py --n 1024 --v 32000 --entropy
    python benchmarks/logprob.py --real               # on a GPU: N=8k and 32k, H=3,584, V=152,064 (7B), bf16

On CUDA the Triton path runs beside the chunked torch path and the naive one, one table per N.

Each variant runs in a fresh subprocess, so one variant's allocations cannot hide or inflate another's.
Memory on CPU: the extra resident memory of one forward+backward, peak ru_maxrss (the kernel's high-water mark
of the process's resident set) minus the resident set just before the call (/proc/self/statm), taken after
the inputs exist and after a small warm-up call has loaded the math libraries and thread pools. It counts
what the OS had to provide, allocator caching included; tracemalloc would miss torch's C++ allocations.
The measurement is only valid when the earlier high-water mark was below the call's peak; the worker
checks that. The gradients ([N, H] and [V, H]) are part of both variants' extra memory.
Memory on CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it.
Time: the best of 1 + --repeats calls per variant (the first call included: the naive path's multi-GiB
buffers are fresh mmaps, page faults included, on every call anyway), with the repeats interleaved across
the variants' processes so that changes in a shared machine's load hit all of them alike. Wall and process
CPU seconds are both reported. TFLOP/s counts 8*N*H*V FLOPs (forward logits 2NHV, backward recompute 2NHV,
grad_hidden 2NHV, grad_weight 2NHV); on CUDA it is the number to read for the Triton path.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import fused_logprob  # noqa: E402
from fused_logprob import fused_logprobs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_logprobs(hidden, weight, targets, temperature):
    logits = hidden @ weight.T  # [N, V] in the input dtype, like a plain lm_head
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V] fp32
    return lp.gather(1, targets[:, None]).squeeze(1)  # [N]


def naive_with_entropy(hidden, weight, targets, temperature):
    lp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)  # [N, V]
    return lp.gather(1, targets[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)  # [N], [N]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_step(variant, args):
    """fwd+bwd closure for one variant; the backward gets random upstream gradients."""
    def step(h, w, t, g_logp, g_ent):
        h.grad = w.grad = None
        if variant == "naive":
            out = (naive_with_entropy if args.entropy else naive_logprobs)(h, w, t, args.temperature)
        else:
            out = fused_logprobs(h, w, t, temperature=args.temperature, return_entropy=args.entropy,
                                 backend=variant)
        torch.autograd.backward(out, (g_logp, g_ent) if args.entropy else g_logp)

    return step


def inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype).mul_(h ** -0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    g = torch.randn(n, generator=gen, device=device), torch.randn(n, generator=gen, device=device)
    return hidden, weight, targets, *g


def timed(step, data, cuda):
    """Wall and process-CPU seconds of one fwd+bwd. CPU time is reported too because this lab's cores are
    shared: wall time then also measures the neighbours, CPU time much less so."""
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    step(*data)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def worker(args):
    """One variant in its own process: warm up, measure the first call's memory, then time calls on request
    ("run" on stdin) so that the parent can interleave the variants' timed calls."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fused_logprob.CHUNK_BYTES = int(args.chunk_mib * 2**20)
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype]
    step = make_step(args.worker, args)
    data = inputs(args.n, args.h, args.v, dtype, args.device)
    # warm-up: libraries, thread pools, Triton compilation (for the real shapes: Triton specialises on
    # divisibility). On CPU a small one, since a full call would raise the ru_maxrss high-water mark.
    step(*(data if cuda else inputs(64, args.h, 1000, dtype, args.device)))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, maxrss_before = rss_bytes(), maxrss_bytes()
    wall, cpu = timed(step, data, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else maxrss_bytes()
    # a call that stays below the process's earlier high-water mark (tiny shapes) has no measurable peak
    extra = None if not cuda and peak <= maxrss_before else peak - base
    print(json.dumps({"extra_bytes": extra, "wall": wall, "cpu": cpu}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        wall, cpu = timed(step, data, cuda)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def main():
    p = cli.ArgumentParser(prog="logprob.py", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096], help="tokens (several: one table each)")
    p.add_argument("--real", action="store_true", help="the 7B shapes: --n 8192 32768 --h 3584 --v 152064, bf16")
    p.add_argument("--h", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--entropy", action="store_true", help="also return the entropy and backprop through it")
    p.add_argument("--chunk-mib", type=float, default=fused_logprob.CHUNK_BYTES / 2**20,
                   help="torch path: fp32 MiB of logits per token chunk")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timed calls per variant after the first")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for flag, value, ok, valid in (("--n", min(args.n), min(args.n) >= 1, ">= 1"), ("--h", args.h, args.h >= 1, ">= 1"),
                                   ("--v", args.v, args.v >= 1, ">= 1"),
                                   ("--temperature", args.temperature, 0 < args.temperature < float("inf"), "> 0"),
                                   ("--chunk-mib", args.chunk_mib, 0 < args.chunk_mib < float("inf"), "> 0"),
                                   ("--threads", args.threads, args.threads >= 0, ">= 0 (0: torch's default)"),
                                   ("--repeats", args.repeats, args.repeats >= 0, ">= 0")):
        if not ok:
            cli.fail("logprob.py", f"{flag} {value:g}: must be {valid}")
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.fail("logprob.py", "--device cuda: no CUDA device here (use --device cpu)")
    if args.real:
        args.n, args.h, args.v, args.dtype = [8192, 32768], 3584, 152064, args.dtype or "bf16"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.worker:
        args.n = args.n[0]
        return worker(args)
    for n in args.n:
        compare(args, n)


def compare(args, n):
    """One table: every variant at n tokens, each in its own worker process."""
    variants = ["naive", "torch"] + (["triton"] if args.device == "cuda" else [])
    procs, results = {}, {}
    for variant in variants:  # first calls one after another: no two variants' peaks overlap
        cmd = [sys.executable, os.path.abspath(__file__), "--n", str(n), "--h", str(args.h), "--v", str(args.v),
               "--temperature", str(args.temperature), "--chunk-mib", str(args.chunk_mib), "--threads",
               str(args.threads), "--worker", variant, "--dtype", args.dtype, "--device", args.device]
        cmd += ["--entropy"] if args.entropy else []
        procs[variant] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = procs[variant].stdout.readline()
        if not line:
            sys.exit(f"{variant} worker failed (exit {procs[variant].wait()})")
        first = json.loads(line)
        results[variant] = {"extra_bytes": first["extra_bytes"], "walls": [first["wall"]], "cpus": [first["cpu"]]}
    for _ in range(args.repeats):  # interleaved, so slow drifts of the machine's load hit all variants alike
        for variant, proc in procs.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            r = json.loads(proc.stdout.readline())
            results[variant]["walls"].append(r["wall"])
            results[variant]["cpus"].append(r["cpu"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    threads = args.threads or torch.get_num_threads()
    print(f"N={n} H={args.h} V={args.v} dtype={args.dtype} device={args.device} entropy={args.entropy} "
          f"chunk={args.chunk_mib:g} MiB threads={threads} calls/variant={1 + args.repeats}; "
          f"naive fp32 logits alone = {n * args.v * 4 / 2**20:.0f} MiB")
    print(f"{'variant':8} {'extra MiB':>10} {'wall ms':>9} {'cpu s':>8} {'mem/naive':>10} {'wall/naive':>10} "
          f"{'cpu/naive':>10} {'TFLOP/s':>8}")
    ref = results["naive"]
    for variant, r in results.items():
        wall, cpu = min(r["walls"]), min(r["cpus"])  # best call: least disturbed by the neighbours
        mem, ref_mem = r["extra_bytes"], ref["extra_bytes"]
        mib = "n/a" if mem is None else f"{mem / 2**20:.1f}"
        mem_ratio = "n/a" if mem is None or ref_mem is None else f"{mem / ref_mem:.3f}"
        print(f"{variant:8} {mib:>10} {wall * 1e3:9.1f} {cpu:8.2f} {mem_ratio:>10} {wall / min(ref['walls']):10.3f} "
              f"{cpu / min(ref['cpus']):10.3f} {8 * n * args.h * args.v / wall / 1e12:8.3f}")
    print("per-call wall s: " + "; ".join(f"{v} " + " ".join(f"{t:.1f}" for t in r["walls"])
                                          for v, r in results.items()))


if __name__ == "__main__":
    main()
