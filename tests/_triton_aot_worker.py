"""Compile fused_logprob's Triton kernels ahead of time for real GPUs, without one; run by tests/test_triton_aot.py.

Must run in a process where TRITON_INTERPRET is unset (under the interpreter the kernels are not JITFunctions).
Each variant is one specialization the launchers in fused_logprob.py can produce: the tiles from tiles_for, the
constexprs from _fwd_constexprs / _bwd_constexprs (the launchers' own helpers), lowered with
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) to PTX and a cubin by the ptxas inside the
triton wheel. Prints one JSON object per variant: shared memory per block (compiled.metadata.shared), and the
registers and spills from `ptxas -v` on compiled.asm["ptx"], or the compile error.

    python tests/_triton_aot_worker.py [--shard I --of K]     compiles variants I, I+K, I+2K, ...
                                                            (last line: {"done": compiled, "of": assigned})
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fused_logprob as fl  # noqa: E402

# max shared memory per block (the opt-in limit, cudaDevAttrMaxSharedMemoryPerBlockOptin) per architecture
SMEM_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}  # A100, L4/L40S/RTX 4090, H100/H200
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the backward's (WITH_ENTROPY, NEED_GH, NEED_GW): entropy with or without a gradient x the needed input grads
# (both: train.py's step; one: a frozen lm_head or hidden); (False, False) launches nothing
BWD_FLAGS = [(ent, gh, gw) for ent in (True, False) for gh, gw in ((True, True), (True, False), (False, True))]


def variants():
    """(arch, dtype name, kernel name, flags, aligned) of every compile. fp16 differs from bf16 only in the
    operand type (same tiles, same tf32 dots), so it gets the forward and train.py's backward (both grads) only.
    Unaligned (see alignment_attrs): the forward with entropy and the backward with everything, in bf16 and fp32."""
    out = []
    for arch in SMEM_LIMIT:
        for dt in DTYPES:
            out += [(arch, dt, "fwd", (ent,), True) for ent in (True, False)]
            out += [(arch, dt, "bwd", f, True) for f in BWD_FLAGS if dt != "fp16" or f[1:] == (True, True)]
            if dt != "fp16":
                out += [(arch, dt, "fwd", (True,), False), (arch, dt, "bwd", BWD_FLAGS[0], False)]
    return out


def signature(kernel, dtype_name, constexprs):
    """Argument types as the JIT derives them from the launchers' arguments: hidden/weight in the input dtype,
    int64 targets, fp32 everything else (outputs, lse, E_p[z], upstream grads, fp32 grad accumulators)."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr"):
            sig[name] = f"*{dtype_name}"
        elif name == "t_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("N", "V", "H", "ignore_index"):
            sig[name] = "i32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name!r}; update the worker's signature()")
    return sig


def alignment_attrs(kernel, sig, aligned):
    """The JIT marks 16-byte-aligned pointers and ints divisible by 16 (tt.divisibility 16), and compiles one
    kernel per such specialization. Aligned: a typical launch, every tensor 16-byte aligned and V, H multiples
    of 16 (Qwen2.5-7B: V=152,064, H=3,584), N arbitrary; its vectorized loads become async copies that the
    pipeliner buffers in shared memory. Unaligned: an H that is no multiple of 16 (the tests' shapes) or a view
    at an odd offset; no vectorized loads, usually less shared memory but not always (sm_90's fp32 backward)."""
    if not aligned:
        return {}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or name in ("V", "H")}


def ptxas_for(arch):
    """The ptxas triton itself runs for arch (bin/ptxas for sm_8x, bin/ptxas-blackwell, a newer CUDA, for sm_90+:
    the PTX version triton emits follows it) and the --gpu-name it passes."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        return get_ptxas(arch).path, sm_arch_from_capability(arch)
    except ImportError:  # another triton layout: the binaries shipped in the wheel
        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        return str(bin_dir / ("ptxas" if arch < 90 else "ptxas-blackwell")), f"sm_{arch}{'a' if arch == 90 else ''}"


def ptxas_usage(ptx, arch):
    """Registers per thread and spill bytes from `ptxas -v` (the flags triton uses that affect allocation)."""
    ptxas, gpu = ptxas_for(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None, spill_loads=int(spill.group(2)) if spill else None)


def compile_variant(arch, dtype_name, kernel_name, flags, aligned):
    dtype = DTYPES[dtype_name]
    fwd_tiles, bwd_tiles = fl.tiles_for((arch // 10, arch % 10), dtype)
    if kernel_name == "fwd":
        kernel, tiles, constexprs = fl._fwd_kernel, fwd_tiles, fl._fwd_constexprs(fwd_tiles, dtype, *flags)
    else:
        kernel, tiles, constexprs = fl._bwd_kernel, bwd_tiles, fl._bwd_constexprs(bwd_tiles, dtype, *flags)
    sig = signature(kernel, dtype_name, constexprs)
    row = dict(arch=arch, dtype=dtype_name, kernel=kernel_name, flags=list(flags), aligned=aligned,
               tiles=vars(tiles).copy(), smem_limit=SMEM_LIMIT[arch])
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, sig, constexprs, alignment_attrs(kernel, sig, aligned)),
                                  target=GPUTarget("cuda", arch, 32), options=tiles.options)
        row["shared"] = compiled.metadata.shared
        row.update(ptxas_usage(compiled.asm["ptx"], arch))
    except Exception:  # reported to the test, which fails on it
        row["error"] = traceback.format_exc(limit=3)[-4000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--of", type=int, default=1)
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    mine, done = variants()[args.shard::args.of], 0
    for v in mine:
        print(json.dumps(compile_variant(*v)), flush=True)
        done += 1
    print(json.dumps(dict(done=done, of=len(mine))), flush=True)


if __name__ == "__main__":
    main()
