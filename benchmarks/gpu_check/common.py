"""Shared helpers of launch/gpu_check.sh's parts (benchmarks/gpu_check/<part>): arguments, checks, the part's one
summary line and gpu_check/<part>.json, timing and peak memory.

Every part runs as its own process, `python -m benchmarks.gpu_check.<module> --out DIR [--quick] [--tiny]
[--device cpu]`, from the repository root, and ends with exactly one line on stdout:

    PASS <part>: <what was measured>  |  FAIL <part>: <which check, by how much>  |  SKIP <part>: <why>

(everything else goes to stderr, which the launcher keeps in DIR/<part>.log), and DIR/<part>.json: status,
summary, seconds, device, every check with its numbers and tolerance, and the part's own measurements. Exit 0 on
PASS and SKIP, 1 on FAIL (a check failed or the part raised: the traceback is in the JSON and the log).

--tiny: the same code paths at tiny shapes (seconds); --device cpu (needs --tiny): on the CPU, the Triton kernels
in the interpreter (TRITON_INTERPRET=1, set here before anything imports triton) -- what tests/test_gpu_check.py
runs, so that a typo is found without a GPU. Numbers from --device cpu measure nothing about a GPU.
"""
import json
import os
import platform
import signal
import sys
import time
import traceback

import cli

# part name (the JSON and the summary line) -> module under benchmarks/gpu_check (not named like the project's
# own modules or packages: `import memory` / `import vllm` must never find a part)
PARTS = {"kernels": "kernels", "speed": "speed", "memory": "memory_check", "train": "train_check",
         "vllm": "vllm_check"}
GIB = 2**30


class Skip(Exception):
    """Raised by a part that cannot run here for a reason that is not a failure (vllm not installed)."""


class Killed(BaseException):
    """SIGTERM (the launcher's `timeout` at the part's budget): the part stops and records what it has done so far.
    A BaseException, so that a part's own `except Exception` (a variant that raised) does not swallow it."""


def _on_sigterm(signum, frame):
    raise Killed("killed by SIGTERM (over the launcher's time budget)")


def parse_args(part, argv=None):
    p = cli.ArgumentParser(prog=f"gpu_check {part}", description=f"launch/gpu_check.sh's {part} part")
    p.add_argument("--out", default="gpu_check", help="directory of <part>.json (default gpu_check)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps (the launcher's --quick)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the code paths in seconds, no real sizes")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: CPU fallbacks (Triton interpreter), with --tiny only")
    a = p.parse_args(argv)
    if a.device == "cpu" and not a.tiny:
        cli.fail(p.command, "--device cpu runs only with --tiny (the real shapes would take hours on a CPU)")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            cli.fail(p.command, "--device cuda: no CUDA GPU here (torch.cuda.is_available() is False; on a CPU: "
                     "--device cpu --tiny)")
    why = cli.unwritable(a.out, directory=True)
    if why:
        cli.fail(p.command, f"--out {a.out}: {why}")
    if a.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (fused_logprob imports it)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children too: train.py picks CUDA whenever it sees one
    return a


class Report:
    """The checks and measurements of one part; `check` records a named comparison against its tolerance."""

    def __init__(self, part, args):
        self.part, self.args, self.checks, self.data = part, args, [], {}

    def check(self, name, ok, **numbers):
        self.checks.append({"name": name, "ok": bool(ok), **numbers})
        if not ok:
            print(f"check failed: {name} {numbers}", file=sys.stderr, flush=True)
        return bool(ok)

    def failed(self):
        return [c["name"] for c in self.checks if not c["ok"]]


def device_info(device):
    import torch
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return info


def run(part, body, argv=None):
    """Parse the arguments, run body(args, report) -> summary text, write <out>/<part>.json, print the one line,
    exit. A raised Skip is SKIP; any other exception, a failed check, or SIGTERM (Killed) is FAIL."""
    args = parse_args(part, argv)
    import torch
    device = torch.device(args.device)
    rep = Report(part, args)
    t0, status, error = time.time(), "pass", None
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = body(args, rep)
    except Skip as e:
        status, summary = "skip", str(e)
    except Killed as e:  # the checks done so far stay in the JSON
        status, summary = "fail", f"{e} after {len(rep.checks)} checks ({len(rep.failed())} failed)"
    except Exception as e:  # noqa: BLE001 -- a part's failure is a FAIL line; the traceback goes to the JSON + log
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        status, summary = "fail", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if status == "pass" and rep.failed():
        status = "fail"
        summary = f"failed {', '.join(rep.failed())}; {summary}"
    seconds = time.time() - t0
    record = {"part": part, "status": status, "summary": summary, "seconds": seconds, "args": vars(args),
              "env": device_info(device), "checks": rep.checks, **rep.data}
    if error:
        record["error"] = error
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{part}.json"), "w") as f:
        json.dump(record, f, indent=2, default=_jsonable)
    print(f"{status.upper()} {part}: {summary} ({seconds:.0f} s)", flush=True)
    sys.exit(1 if status == "fail" else 0)


def _jsonable(x):
    return str(x)  # (tensors, dtypes, paths in a record: their text)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats):
    """Median wall milliseconds of fn() over `repeats` calls after one warm-up call (compilation, autotuning, the
    allocator's first blocks), with the device synchronised around each call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(fn, device):
    """Bytes fn() allocates above what was allocated before it (torch.cuda.max_memory_allocated); None on CPU,
    which has no allocator statistics."""
    import torch
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def rel_err(a, ref):
    """||a - ref|| / ||ref|| (Frobenius, fp32) and max|a - ref| / max|ref|: one number for the bulk and one that a
    few wrong elements cannot hide in."""
    a, ref = a.float(), ref.float()
    diff = a - ref
    scale_n, scale_m = ref.norm().item(), ref.abs().max().item() if ref.numel() else 0.0
    return (diff.norm().item() / max(scale_n, 1e-30), (diff.abs().max().item() if diff.numel() else 0.0)
            / max(scale_m, 1e-30))


def gib(x):
    return None if x is None else x / GIB
