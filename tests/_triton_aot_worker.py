"""Compile triton_logprob's kernels ahead of time for real GPUs, without one; run by tests/test_triton_aot.py.

Must run in a process where TRITON_INTERPRET is unset (under the interpreter the kernels are not JITFunctions).
Each variant is one specialization the launchers in triton_logprob.py can produce: the tiles from tiles_for, the
constexprs from constexprs() (the launchers' own helper), lowered with
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) to PTX and a cubin by the ptxas inside the
triton wheel. Prints one JSON object per variant: shared memory per block (compiled.metadata.shared), the
registers and spills from `ptxas -v` on compiled.asm["ptx"], the MMA instructions and the count of atomic
instructions in the PTX, or the compile error.

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

import triton_logprob as tlp  # noqa: E402

# max shared memory per block (the opt-in limit, cudaDevAttrMaxSharedMemoryPerBlockOptin) per architecture
SMEM_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}  # A100, L4/L40S/RTX 4090, H100/H200
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"fwd": tlp._fwd_kernel, "dz": tlp._dz_kernel}


def variants():
    """(arch, dtype name, kernel name, with_entropy, candidate index, aligned) of every compile: each kernel with and
    without entropy for every candidate of tiles_for. fp16 differs from bf16 only in the operand type (same tiles),
    so it gets the entropy variants only. Unaligned (see alignment_attrs): the default candidate with entropy, in
    bf16 and fp32."""
    out = []
    for arch in SMEM_LIMIT:
        for dt, dtype in DTYPES.items():
            for i, kname in enumerate(KERNELS):
                for c in range(len(tlp.tiles_for((arch // 10, arch % 10), dtype)[i])):
                    out += [(arch, dt, kname, ent, c, True) for ent in ((True,) if dt == "fp16" else (True, False))]
                if dt != "fp16":
                    out.append((arch, dt, kname, True, 0, False))
    return out


def signature(kernel, dtype_name, constexprs):
    """Argument types as the JIT derives them from the launchers' arguments: hidden, weight and dz in the input
    dtype, int64 targets, fp32 everything else (partials, lse, E_p[z], upstream grads), i32 sizes."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr", "dz_ptr"):
            sig[name] = f"*{dtype_name}"
        elif name == "t_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("N", "V", "H", "SPLIT_V", "NUM_SPLITS", "N_BUCKET"):
            sig[name] = "i32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name!r}; update the worker's signature()")
    return sig


# ints that are multiples of 16 in every real launch: V and H of real models, SPLIT_V (a multiple of the tiles'
# block_v), N_BUCKET (a power of two >= 1024)
DIVISIBLE_INTS = ("V", "H", "SPLIT_V", "N_BUCKET")


def alignment_attrs(kernel, sig, aligned):
    """The JIT marks 16-byte-aligned pointers and ints divisible by 16 (tt.divisibility 16), and compiles one
    kernel per such specialization. Aligned: a typical launch, every tensor 16-byte aligned and V, H multiples
    of 16 (Qwen2.5-7B: V=152,064, H=3,584), N arbitrary; its vectorized loads become async copies (TMA-free
    cp.async) that the pipeliner buffers in shared memory. Unaligned: an H that is no multiple of 16 (the tests'
    shapes) or a view at an odd offset: element-wise loads."""
    if not aligned:
        return {}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or name in DIVISIBLE_INTS}


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


# the MMA instructions in the PTX: sm_90's warpgroup MMAs and sm_8x's mma.sync, with their operand types
WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\.(\w+)")
MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.f32\.(\w+)\.(\w+)\.f32")
ATOMIC = re.compile(r"^\s*(atom|red)\.", re.MULTILINE)


def mma_kinds(ptx):
    """Sorted 'wgmma <type>' / 'mma.sync <type>' of every tensor-core MMA in the PTX (empty: FMA dots only)."""
    kinds = {f"wgmma {a}" + ("" if a == b else f"x{b}") for _, a, b in WGMMA.findall(ptx)}
    kinds |= {f"mma.sync {a}" + ("" if a == b else f"x{b}") for _, a, b in MMA_SYNC.findall(ptx)}
    return sorted(kinds)


def compile_variant(arch, dtype_name, kernel_name, with_entropy, candidate, aligned):
    dtype = DTYPES[dtype_name]
    tiles = tlp.tiles_for((arch // 10, arch % 10), dtype)[list(KERNELS).index(kernel_name)][candidate]
    kernel, constexprs = KERNELS[kernel_name], tlp.constexprs(tiles, dtype, with_entropy)
    sig = signature(kernel, dtype_name, constexprs)
    row = dict(arch=arch, dtype=dtype_name, kernel=kernel_name, entropy=with_entropy, candidate=candidate,
               aligned=aligned, tiles=vars(tiles).copy(), smem_limit=SMEM_LIMIT[arch])
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, sig, constexprs, alignment_attrs(kernel, sig, aligned)),
                                  target=GPUTarget("cuda", arch, 32), options=tiles.options)
        ptx = compiled.asm["ptx"]
        row["shared"] = compiled.metadata.shared
        row["mma"] = mma_kinds(ptx)
        row["atomics"] = len(ATOMIC.findall(ptx))
        row.update(ptxas_usage(ptx, arch))
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
