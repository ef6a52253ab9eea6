"""gpu_check part 1, kernels: fused_logprobs with backend triton and torch against a naive fp32 reference at the 7B's
shapes (H = 3,584, V = 152,064; N = 4,096 and 16,384 tokens; bf16 inputs).

Per case and backend: logp and entropy (fp32 outputs), dh and dW (the inputs' dtype) of the loss
sum_n g_n logp_n + e_n ent_n (random upstream g, e), against autograd through log_softmax on the same bf16 values
upcast to fp32 (fp32 GEMMs, TF32 off), computed in token chunks so that no [N, V] tensor above 1 GiB exists. Also:
ignored targets (10% of them: logp = ent = 0 and zero rows of dh, exactly), temperature 0.7, unaligned sizes
(V = 152,063 and H = 3,583, an odd N), the logp-only path (no entropy) and determinism (two triton runs bitwise
equal: the kernels use no atomics). Autotuning is off here (the first candidate of tiles_for): correctness does not
depend on the pick, since the candidates of one list share block_h and the forward's share block_v (the same
reduction order), and it saves compiles for the speed part, which autotunes.

Tolerances:
  logp, entropy: 2e-3 nats absolute. Both backends multiply bf16 values exactly (a bf16 x bf16 product fits fp32's
    mantissa) and accumulate in fp32, as the reference does; what differs is the summation order of 3,584 products
    (~sqrt(H) * 2^-24 * |z|, about 1e-5 at |z| ~ 10) and of 152,064 exponentials. 2e-3 leaves 100x of that, and
    still fails a kernel that rounds the logits to bf16 (|z| * 2^-9 ~ 2e-2 at |z| = 10).
  dh, dW: relative Frobenius error <= 1e-2 and max-abs error <= 5e-2 x max|ref|. Both are returned in bf16 (a
    rounding of <= 2^-9 = 0.2% per element); the triton path also stores dz in bf16 before its GEMMs (another 0.2%
    per term, which partly averages out over the 152,064 or N terms of each sum): expected ~0.3-0.5% in norm. 1e-2
    is 2-3x that; a lost vocabulary tile (128 of 152,064 columns, ~3% of the norm), a missing entropy term or a
    wrong temperature factor is far above it. The max-abs bound catches a few wrong rows the norm would dilute.
"""
import math

import torch

from benchmarks.gpu_check import common

IGNORE = -100
TOL_LOGP = 2e-3
TOL_GRAD_NORM, TOL_GRAD_MAX = 1e-2, 5e-2
REAL_H, REAL_V = 3584, 152064


def cases(args):
    """(name, N, H, V, temperature, entropy) of every case this run checks."""
    if args.tiny:  # several vocabulary slices, token blocks and backward chunks at sizes the interpreter runs
        return [("main", 160, 64, 1000, 1.0, True), ("unaligned", 77, 63, 999, 0.7, True),
                ("logp_only", 130, 64, 1000, 0.7, False)]
    h, v = REAL_H, REAL_V
    out = [("main_4096", 4096, h, v, 1.0, True), ("unaligned", 1023, h - 1, v - 1, 0.7, True)]
    if not args.quick:
        out += [("main_16384", 16384, h, v, 1.0, True), ("temperature", 4096, h, v, 0.7, True),
                ("logp_only", 4095, h, v - 1, 1.0, False)]
    return out


def make_inputs(n, h, v, device, seed=0):
    """bf16 hidden ~ N(0, 1) and W ~ N(0, 4/H): logits of std ~2 (max ~10 over the vocabulary, a peaked softmax as
    a trained lm_head gives, not a flat one); 10% ignored targets, one target in the last vocabulary entry."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen, device=device) * (2.0 / math.sqrt(h))).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.randperm(n, generator=gen, device=device)[: n // 10]
    targets[ignored] = IGNORE
    targets[-1] = v - 1
    g = torch.randn(n, generator=gen, device=device)
    e = torch.randn(n, generator=gen, device=device)
    return hidden, weight, targets, g, e


def reference(hidden, weight, targets, temperature, g, e, with_entropy):
    """Autograd through log_softmax in fp32, in chunks of ~1 GiB of logits -> logp, ent, dh, dW (fp32)."""
    w32 = weight.float().requires_grad_()
    rows = max(1, 2**30 // (4 * weight.shape[0]))
    logps, ents, dhs = [], [], []
    for s in range(0, hidden.shape[0], rows):
        h32 = hidden[s:s + rows].float().requires_grad_()
        t = targets[s:s + rows]
        valid = t != IGNORE  # [C]
        lp = torch.log_softmax(h32 @ w32.T / temperature, dim=-1)  # [C, V]
        logp = torch.where(valid, lp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1), 0.0)  # [C]
        ent = torch.where(valid, -(lp.exp() * lp).sum(-1), 0.0)  # [C]
        loss = (logp * g[s:s + rows]).sum() + ((ent * e[s:s + rows]).sum() if with_entropy else 0.0)
        loss.backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
        dhs.append(h32.grad)
        del lp, loss
    return torch.cat(logps), torch.cat(ents), torch.cat(dhs), w32.grad


def run_backend(backend, hidden, weight, targets, temperature, g, e, with_entropy):
    from fused_logprob import fused_logprobs
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_logprobs(h, w, targets, temperature=temperature, return_entropy=with_entropy, backend=backend)
    logp, ent = out if with_entropy else (out, None)
    loss = (logp * g).sum() + ((ent * e).sum() if with_entropy else 0.0)
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


def compare(rep, name, got, ref, targets, with_entropy):
    logp, ent, dh, dw = got
    r_logp, r_ent, r_dh, r_dw = ref
    ignored = targets == IGNORE
    res = {"logp_max_abs": (logp - r_logp).abs().max().item()}
    rep.check(f"{name} logp", res["logp_max_abs"] <= TOL_LOGP, value=res["logp_max_abs"], tol=TOL_LOGP)
    if with_entropy:
        res["entropy_max_abs"] = (ent - r_ent).abs().max().item()
        rep.check(f"{name} entropy", res["entropy_max_abs"] <= TOL_LOGP, value=res["entropy_max_abs"], tol=TOL_LOGP)
    for key, a, b in (("dh", dh, r_dh), ("dW", dw, r_dw)):
        norm, mx = common.rel_err(a, b)
        res[f"{key}_rel_norm"], res[f"{key}_rel_max"] = norm, mx
        rep.check(f"{name} {key}", norm <= TOL_GRAD_NORM and mx <= TOL_GRAD_MAX, rel_norm=norm, rel_max=mx,
                  tol_norm=TOL_GRAD_NORM, tol_max=TOL_GRAD_MAX)
    exact = bool((logp[ignored] == 0).all() and (dh[ignored] == 0).all()
                 and (not with_entropy or (ent[ignored] == 0).all()))
    res["ignored_exact_zero"] = exact
    rep.check(f"{name} ignored targets", exact, ignored=int(ignored.sum()))
    res["finite"] = bool(all(torch.isfinite(x).all() for x in got if x is not None))
    rep.check(f"{name} finite", res["finite"])
    return res


def bitwise_equal(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def body(args, rep):
    import triton_logprob
    triton_logprob.AUTOTUNE = False  # (module docstring)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference and the torch path in true fp32
    results, worst = {}, {}
    for name, n, h, v, temperature, with_entropy in cases(args):
        hidden, weight, targets, g, e = make_inputs(n, h, v, device)
        ref = reference(hidden, weight, targets, temperature, g, e, with_entropy)
        results[name] = {"N": n, "H": h, "V": v, "temperature": temperature, "entropy": with_entropy}
        for backend in ("torch", "triton"):
            got = run_backend(backend, hidden, weight, targets, temperature, g, e, with_entropy)
            res = compare(rep, f"{name} {backend}", got, ref, targets, with_entropy)
            if backend == "triton":
                again = run_backend(backend, hidden, weight, targets, temperature, g, e, with_entropy)
                res["deterministic"] = bitwise_equal(got, again)
                rep.check(f"{name} triton deterministic", res["deterministic"])
                del again
            results[name][backend] = res
            for k, val in res.items():
                if isinstance(val, float):
                    worst[(backend, k)] = max(worst.get((backend, k), 0.0), val)
            del got
        del ref, hidden, weight
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (the next case's reference needs the room; this is a test harness)
    rep.data["cases"] = results
    rep.data["tolerances"] = {"logp_entropy_abs": TOL_LOGP, "grad_rel_norm": TOL_GRAD_NORM,
                              "grad_rel_max": TOL_GRAD_MAX}
    fmt = lambda b: (f"{b} logp {worst[(b, 'logp_max_abs')]:.1e} dh {worst[(b, 'dh_rel_norm')]:.1e} "  # noqa: E731
                     f"dW {worst[(b, 'dW_rel_norm')]:.1e}")
    return (f"{len(results)} cases ({', '.join(results)}), worst vs fp32: {fmt('triton')}; {fmt('torch')} "
            f"(tol {TOL_LOGP:g} nats, {TOL_GRAD_NORM:g} rel); triton bitwise deterministic: "
            f"{all(r['triton'].get('deterministic') for r in results.values())}")


if __name__ == "__main__":
    common.run("kernels", body)
