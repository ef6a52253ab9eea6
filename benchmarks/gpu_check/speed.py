"""gpu_check part 2, speed: each log-prob backend's time as a fraction of what the GPU's own GEMM reaches, measured
in the same process, with its peak memory and autotuning's pick per shape.

At H = 3,584, V = 152,064, bf16, N = 4,096 and 16,384 tokens (--quick: 4,096): the time of one plain cuBLAS GEMM
torch.mm([N, H], [H, V]) -- the FLOPs of the logits, 2NHV -- is the yardstick. Forward (no grad: the reference
pre-pass's use) does the FLOPs of 1 such GEMM, forward+backward of 4 (logits, their recompute, dh, dW), so
    gemm_fraction_fwd = t_gemm / t_fwd,    gemm_fraction_fwd_bwd = 4 t_gemm / t_fwd_bwd
(1.0 = as fast as cuBLAS on the same FLOPs; the fused paths also do the softmax, so somewhat below 1 is the
expected best). Variants: naive (bf16 logits, fp32 log_softmax: benchmarks/logprob.py's), torch (chunked, fp32
GEMMs), triton (with entropy, as train.py calls it), triton_logp (no entropy, like the cross-entropies below), and
where installed Liger's fused linear cross-entropy and Cut Cross-Entropy (reduction sum, logp only). Peak memory:
torch.cuda.max_memory_allocated during one forward+backward minus what was allocated before (inputs excluded,
gradients included). Times: the median of --repeats calls after one warm-up call (compilation, autotuning).
Autotuning is on (triton_logprob.AUTOTUNE); its pick per key (H, V, token bucket, dtypes) is read from the
autotuner. No check on the numbers: the part fails only when one of the project's variants raises or gives a
non-finite time (Liger's or CCE's error is recorded in the JSON and named on the line: a third-party API change
only loses its row). Liger computes its gradients inside the forward, so its "fwd" time includes them.
"""
import importlib.util
import math
import sys
import traceback
import types

import torch

from benchmarks.gpu_check import common

REAL_H, REAL_V = 3584, 152064
OPTIONAL = ("liger", "cce")


def shapes(args):
    if args.tiny:
        return [(128, 64, 500)]  # (the interpreter: ~1 s per triton call)
    return [(4096, REAL_H, REAL_V)] + ([] if args.quick else [(16384, REAL_H, REAL_V)])


def optional_variants():
    """{name: step factory or the reason it is skipped} for the third-party fused cross-entropies."""
    out = {}
    if importlib.util.find_spec("liger_kernel") is not None:
        def liger(h, w, t):
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, t)
        out["liger"] = liger
    else:
        out["liger"] = "not installed (pip install liger-kernel)"
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        def cce(h, w, t):
            from cut_cross_entropy import linear_cross_entropy
            return linear_cross_entropy(h, w, t, reduction="sum")
        out["cce"] = cce
    else:
        out["cce"] = "not installed (pip install cut-cross-entropy)"
    return out


def variant_steps(device):
    """{name: (fwd(data), fwd_bwd(data))} where data = (hidden, weight, targets, g_logp, g_ent)."""
    from benchmarks import logprob as bl
    from fused_logprob import fused_logprobs

    args_ent = types.SimpleNamespace(entropy=True, temperature=1.0)
    steps = {}
    for name in ("naive", "torch", "triton"):
        fwd_bwd = bl.make_step(name, args_ent)
        if name == "naive":
            fwd = lambda d: bl.naive_with_entropy(d[0], d[1], d[2], 1.0)  # noqa: E731
        else:
            fwd = lambda d, b=name: fused_logprobs(d[0], d[1], d[2], return_entropy=True, backend=b)  # noqa: E731
        steps[name] = (fwd, lambda d, s=fwd_bwd: s(*d))
        if name == "triton":
            steps["triton_logp"] = (lambda d: fused_logprobs(d[0], d[1], d[2], backend="triton"),
                                    lambda d: _backward(fused_logprobs(d[0], d[1], d[2], backend="triton"), d))
    if device.type != "cuda":
        return steps, {k: "needs CUDA" for k in ("liger", "cce")}
    skipped = {}
    for name, fn in optional_variants().items():
        if isinstance(fn, str):
            skipped[name] = fn
        else:
            steps[name] = (lambda d, f=fn: f(d[0], d[1], d[2]), lambda d, f=fn: _backward(f(d[0], d[1], d[2]), d))
    return steps, skipped


def _backward(out, d):
    d[0].grad = d[1].grad = None
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(d[3])


def autotune_picks(device):
    """{kernel: {key: config}} from triton_logprob's autotuners (CUDA with AUTOTUNE on only)."""
    import triton_logprob as tlp
    if device.type != "cuda" or not tlp.AUTOTUNE:
        return {"note": "no autotuning here (the interpreter launches the first candidate)"}
    props = torch.cuda.get_device_properties(device)
    return picks_of((props.major, props.minor))


def picks_of(capability):
    """{"fwd" | "dz": {autotuning key: the chosen config and its index in tiles_for's candidates}}."""
    import triton_logprob as tlp
    fwd, dz = tlp.tiles_for(capability, torch.bfloat16)
    picks = {}
    for name, kernel, cands in (("fwd", tlp._fwd_kernel, fwd), ("dz", tlp._dz_kernel, dz)):
        tuner = tlp._tuned(kernel, cands)
        picks[name] = {str(key): {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                  "candidate": _candidate_index(cfg, cands)}
                       for key, cfg in getattr(tuner, "cache", {}).items()}
    return picks


def _candidate_index(cfg, cands):
    for i, t in enumerate(cands):
        if t.meta == {k: cfg.kwargs.get(k) for k in t.meta} and (t.num_warps, t.num_stages) == (cfg.num_warps,
                                                                                             cfg.num_stages):
            return i
    return None


def measure(n, h, v, device, repeats, steps, rep):
    from benchmarks import logprob as bl
    data = bl.inputs(n, h, v, torch.bfloat16, device)
    a, b = data[0].detach(), data[1].detach().T  # [N, H], [H, V] (the lm_head GEMM's layout)
    gemm = common.time_ms(lambda: torch.mm(a, b), device, repeats)
    row = {"N": n, "H": h, "V": v, "gemm_ms": gemm, "gemm_tflops": 2 * n * h * v / gemm / 1e9, "variants": {}}
    for name, (fwd, fwd_bwd) in steps.items():
        try:
            with torch.no_grad():
                t_fwd = common.time_ms(lambda: fwd(data), device, repeats)
            t_all = common.time_ms(lambda: fwd_bwd(data), device, repeats)
            peak = common.peak_extra_bytes(lambda: fwd_bwd(data), device)
        except Exception as e:  # noqa: BLE001 -- recorded per variant; the project's own variants fail the part
            row["variants"][name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            print(f"N={n} {name} raised:", file=sys.stderr)
            traceback.print_exc()
            if name not in OPTIONAL:  # (a third-party API change only loses its row)
                rep.check(f"N={n} {name} runs", False, error=row["variants"][name]["error"])
            continue
        r = {"fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "gemm_fraction_fwd": gemm / t_fwd,
             "gemm_fraction_fwd_bwd": 4 * gemm / t_all, "peak_extra_gib": common.gib(peak)}
        row["variants"][name] = r
        rep.check(f"N={n} {name} timed", math.isfinite(t_fwd) and math.isfinite(t_all) and t_all > 0)
        print(f"N={n} {name}: {r}", flush=True)
        data[0].grad = data[1].grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (each variant's peak from the same starting point)
    return row


def body(args, rep):
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # (the torch path's fp32 GEMMs as fp32; reported as such)
    steps, skipped = variant_steps(device)
    repeats = 1 if args.tiny else 2 if args.quick else 3
    rows = [measure(n, h, v, device, repeats, steps, rep) for n, h, v in shapes(args)]
    rep.data.update(shapes=rows, skipped=skipped, autotune=autotune_picks(device), repeats=repeats)
    last = rows[-1]
    parts = []
    for name in ("triton", "torch", "naive", *OPTIONAL):
        r = last["variants"].get(name)
        if r and "error" in r:
            parts.append(f"{name} raised (see the JSON)")
        elif r:
            mem = "" if r["peak_extra_gib"] is None else f", {r['peak_extra_gib']:.2f} GiB"
            parts.append(f"{name} {r['gemm_fraction_fwd_bwd']:.2f}x{mem}")
    skip = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return (f"N={last['N']} fwd+bwd as a fraction of cuBLAS ({last['gemm_tflops']:.0f} TFLOP/s): "
            f"{', '.join(parts)}" + (f"; skipped {skip}" if skip else ""))


if __name__ == "__main__":
    common.run("speed", body)
