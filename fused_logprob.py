"""Fused lm_head + log-softmax + gather (+ entropy), forward and backward, never building [N, V] logits.

Math, per token n (h_n = hidden[n] [H], W [V, H], temperature T, target t_n):
    z_nv   = (h_n . W_v) / T                             scaled logits
    lse_n  = log sum_v exp(z_nv)
    logp_n = z_{n,t_n} - lse_n
    p_nv   = exp(z_nv - lse_n)
    ent_n  = lse_n - sum_v p_nv z_nv  (= -sum_v p log p),   E_p[z]_n = lse_n - ent_n
Backward, with upstream g_n = dL/dlogp_n and e_n = dL/dent_n:
    dlogp_n/dz_nv = 1[v = t_n] - p_nv
    dent_n/dz_nv  = -p_nv (z_nv - E_p[z]_n)
    dz_nv   = g_n (1[v = t_n] - p_nv) - e_n p_nv (z_nv - E_p[z]_n)
    dL/dh_n = (1/T) sum_v dz_nv W_v        dL/dW_v = (1/T) sum_n dz_nv h_n
Tokens with target == ignore_index get logp = ent = 0 and g = e = 0 (no gradient). All softmax math is
fp32. Forward saves only the inputs and per-token lse (and E_p[z]); backward recomputes the logits piece
by piece, so extra memory is O(N + V*H + one chunk/tile), never O(N*V).

Backends: "torch" chunks over tokens (CHUNK_BYTES of fp32 logits per chunk): the CPU path and the readable
reference of what the kernels compute. "triton" (kernels in triton_logprob.py): the forward splits the
vocabulary into slices as well as the tokens into blocks, each program keeping an online log-sum-exp over its
slice's tiles (m' = max(m, max_tile z), s' = s exp(m - m') + sum_tile exp(z - m'), likewise sum exp(z - m) z),
and a small combine merges the slices; the backward, per chunk of DZ_CHUNK_BYTES, writes the logit gradients
dz [C, V] in the inputs' dtype with one kernel, then dh = dz @ W and dW += dz^T h (fp32) are cuBLAS GEMMs. No
atomics, so the triton path is deterministic. "auto" = triton for CUDA tensors when triton imports, torch
otherwise (see the README's Fused log-probs section for how that choice stands without a GPU measurement).
Tile sizes depend on the GPU architecture (triton_logprob.tiles_for; tests/test_triton_aot.py compiles every
kernel for sm_80, sm_89 and sm_90 without a GPU). Under fake tensors (torch's FakeTensorMode, for memory
estimates) it allocates its buffers and launches nothing. Under TRITON_INTERPRET=1 (set before triton is
imported) backend="triton" also takes CPU tensors; that is how tests/test_fused_logprob.py checks the kernels.

For the caller (FSDP2): the lm_head weight is a DTensor shard between forward methods. Compute log-probs
inside a model method registered with torch.distributed.fsdp.register_fsdp_forward_method(model, name):
there the weight is the unsharded full Parameter (pass that Parameter itself: it is what this function
saves for backward; a copy would stay alive until backward), and its gradient lands back as a DTensor.
Tied embeddings work the same way (pass the embedding weight).
"""
import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton_logprob as tlp
except ImportError:  # no triton: the torch backend needs none
    tlp = None

BACKENDS = ("auto", "torch", "triton")
# fp32 bytes of one chunk's logits in the torch backend (at most two such buffers live; tests shrink it to
# cross chunk boundaries). 256 MiB is 441 tokens at V=151,936: measured on this lab's 2 CPU cores
# (benchmarks/logprob.py, N=4096, H=512), fwd+bwd took 1.11x the naive time with 256 MiB vs 1.20x with
# 64 MiB (taller chunks make faster GEMMs), for 8% vs 5% of the naive path's extra memory.
CHUNK_BYTES = 256 * 2**20


def fused_logprobs(hidden, weight, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   backend="auto"):
    """log_softmax(hidden @ weight.T / temperature)[n, targets[n]] -> logp [N] fp32 (, entropy [N] fp32)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"need long targets [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))  # [N]
    # one host sync; in the kernel an out-of-range id would silently give logp = -lse. Fake tensors (a memory
    # estimate under FakeTensorMode) have no values to check: bad is fake whenever any input is.
    if not is_fake(bad) and bad.any():
        raise ValueError(f"targets outside [0, {weight.shape[0]}) that are not ignore_index={ignore_index}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and tlp is not None else "torch"
    fn = _ChunkedLogProb
    if backend == "triton":
        _check_triton_inputs(hidden, weight)
        fn = _TritonLogProb
    return fn.apply(hidden, weight, targets, 1.0 / float(temperature), ignore_index, return_entropy)


# --- torch backend: chunks over tokens ---------------------------------------------------------------

def _chunk_rows(vocab):
    return max(1, CHUNK_BYTES // (4 * vocab))


def _upstream(grads, with_entropy, valid):
    """Upstream gradients as fp32 [N], zeroed on ignored tokens; e is None when entropy gets no gradient."""
    g_logp = grads[0]
    g = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device) if g_logp is None else g_logp.float()
    g = torch.where(valid, g, 0.0)  # [N]
    e = grads[1] if with_entropy else None
    e = None if e is None else torch.where(valid, e.float(), 0.0)  # [N]
    return g.contiguous(), None if e is None else e.contiguous()


class _ChunkedLogProb(torch.autograd.Function):
    # CPU notes: each chunk's logits go into one buffer allocated per call (a fresh >32 MiB block would be
    # a new mmap, page faults and zeroing per chunk), and 1/T multiplies the small [C, H] operand, not [C, V].
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, with_entropy):
        n, v = hidden.shape[0], weight.shape[0]
        rows = max(1, min(n, _chunk_rows(v)))
        w32_t = weight.float().T  # [H, V]; a copy only for 16-bit weights (bounded by V*H, not N*V)
        valid = targets != ignore_index  # [N]
        tgt = torch.where(valid, targets, 0)  # [N] a safe gather index
        f32 = dict(dtype=torch.float32, device=hidden.device)
        lse, logp = torch.empty(n, **f32), torch.empty(n, **f32)  # [N], [N]
        ez = torch.empty(n, **f32) if with_entropy else None  # [N] E_p[z]
        zbuf = torch.empty(rows, v, **f32)  # [C, V]
        pbuf = torch.empty(rows, v, **f32) if with_entropy else None  # [C, V]
        for s in range(0, n, rows):
            sl, c = slice(s, s + rows), min(rows, n - s)
            z = torch.mm(hidden[sl].float() * scale, w32_t, out=zbuf[:c])  # [C, V] scaled logits
            m = z.amax(dim=1)  # [C]
            zt = z.gather(1, tgt[sl, None]).squeeze(1)  # [C] target logit
            z.sub_(m[:, None])  # z - m
            if with_entropy:
                ex = torch.exp(z, out=pbuf[:c])  # [C, V] exp(z - m)
                sum_ex = ex.sum(dim=1)  # [C]
                ez[sl] = ex.mul_(z).sum(dim=1) / sum_ex + m  # E_p[z] = sum exp(z - m) (z - m) / sum + m
            else:
                sum_ex = z.exp_().sum(dim=1)  # [C]
            lse[sl] = m + sum_ex.log()
            logp[sl] = zt - lse[sl]
        logp.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.scale, ctx.ignore_index, ctx.with_entropy = scale, ignore_index, with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logp, (lse - ez).masked_fill_(~valid, 0.0)
        return logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        n, v = hidden.shape[0], weight.shape[0]
        rows = max(1, min(n, _chunk_rows(v)))
        valid = targets != ctx.ignore_index  # [N]
        tgt = torch.where(valid, targets, 0)  # [N]
        g, e = _upstream(grads, ctx.with_entropy, valid)  # [N], [N] or None
        gs = g * ctx.scale  # [N] the 1/T of z = x / T folded into the upstream gradient
        w32_t = weight.float().T  # [H, V]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H] hidden's dtype
        grad_w = torch.empty(weight.shape, **f32) if need_w else None  # [V, H] fp32 accumulator
        zbuf = torch.empty(rows, v, **f32)  # [C, V]
        pbuf = torch.empty(rows, v, **f32) if e is not None else None  # [C, V]
        for s in range(0, n, rows):
            sl, c = slice(s, s + rows), min(rows, n - s)
            h32 = hidden[sl].float()  # [C, H]
            z = torch.mm(h32 * ctx.scale, w32_t, out=zbuf[:c])  # [C, V] recomputed scaled logits
            if e is None:  # dz/T = -g p / T, in z's buffer
                dz = z.sub_(lse[sl, None]).exp_().mul_(-gs[sl, None])  # [C, V]
            else:  # dz/T = -p (g + e (z - E_p[z])) / T = p (a + b z), a = (e E_p[z] - g) / T, b = -e / T
                es = e[sl] * ctx.scale  # [C]
                p = torch.sub(z, lse[sl, None], out=pbuf[:c]).exp_()  # [C, V]
                dz = z.mul_(-es[:, None]).add_((es * ez[sl] - gs[sl])[:, None]).mul_(p)  # [C, V]
            dz.scatter_add_(1, tgt[sl, None], gs[sl, None])  # + g / T at the target
            if need_h:
                grad_h[sl] = torch.mm(dz, w32_t.T)  # [C, H]
            if need_w and s == 0:
                torch.mm(dz.T, h32, out=grad_w)  # [V, H]
            elif need_w:
                grad_w.addmm_(dz.T, h32)  # [V, H] fp32 accumulation
        if need_w and n == 0:
            grad_w.zero_()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


# --- triton backend: triton_logprob's kernels, torch GEMMs for the input gradients ---------------------

# bytes of one token chunk's logit gradients dz [C, V] (the inputs' dtype) in the triton backward: 512 MiB is
# 1,664 tokens at V=152,064 in bf16, tall enough that dh = dz @ W and dW += dz^T @ h run as large GEMMs, and
# O(C x V), not O(N x V). Tests shrink it to cross chunk boundaries.
DZ_CHUNK_BYTES = 512 * 2**20


def _dz_rows(n, vocab, dtype):
    """Tokens per backward chunk: DZ_CHUNK_BYTES of dz, a multiple of 128 (the kernels' token block) when above."""
    rows = max(1, DZ_CHUNK_BYTES // (vocab * torch.tensor([], dtype=dtype).element_size()))
    return max(1, min(n, rows if rows < 128 else rows // 128 * 128))


def _grad_gemms(dz, h, weight, grad_h, grad_w):
    """grad_h = dz @ W ([C, H], hidden's dtype) and grad_w += dz^T @ h ([V, H] fp32) for one chunk; dz already holds
    the 1/T. On CUDA (and fake tensors) 16-bit GEMMs accumulate into fp32 with addmm(out_dtype=fp32), so no fp32
    copy of dz exists; torch's CPU kernels lack out_dtype, so under the interpreter the operands are upcast."""
    if grad_h is not None:
        torch.mm(dz, weight, out=grad_h)  # [C, H]
    if grad_w is None:
        return
    if dz.dtype == torch.float32:
        grad_w.addmm_(dz.T, h)  # [V, H]
    elif dz.is_cuda or is_fake(dz):
        torch.addmm(grad_w, dz.T, h, out_dtype=torch.float32, out=grad_w)  # [V, H] fp32 accumulation
    else:
        grad_w.addmm_(dz.T.float(), h.float())  # [V, H]


def _check_triton_inputs(hidden, weight):
    if tlp is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch' or 'auto'")
    if not hidden.is_cuda and not tlp._INTERPRETED and not is_fake(hidden):  # fake: allocations only, no launch
        raise ValueError("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                         "triton is imported (or fake tensors)")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backend='triton' needs hidden and weight of one dtype in fp32/bf16/fp16, got "
                         f"{hidden.dtype}, {weight.dtype}")


class _TritonLogProb(torch.autograd.Function):
    """Forward: triton_logprob.forward (vocabulary-split partials, then combine) -> lse, z_target, E_p[z].
    Backward, per chunk of C tokens: triton_logprob.logit_grads writes dz [C, V], then _grad_gemms. No atomics:
    the same inputs give bitwise the same gradients (tests/test_fused_logprob.py checks it)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, with_entropy):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        valid = targets != ignore_index  # [N]
        lse, zt, ez = tlp.forward(hidden, weight, targets, scale, with_entropy)  # [N] each (ez None without)
        logp = (zt - lse).masked_fill_(~valid, 0.0)  # [N]
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.scale, ctx.ignore_index, ctx.with_entropy = scale, ignore_index, with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logp, (lse - ez).masked_fill_(~valid, 0.0)  # [N], [N]
        return logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        (n, h), v = hidden.shape, weight.shape[0]
        g, e = _upstream(grads, ctx.with_entropy, targets != ctx.ignore_index)  # [N], [N] or None
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H] hidden's dtype
        grad_w = torch.zeros((v, h), dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        if n > 0 and (need_h or need_w):
            rows = _dz_rows(n, v, hidden.dtype)
            dz_buf = torch.empty((rows, v), dtype=hidden.dtype, device=hidden.device)  # [C, V]
            for s in range(0, n, rows):
                sl, dz = slice(s, s + rows), dz_buf[:min(rows, n - s)]  # [C, V]
                tlp.logit_grads(hidden[sl], weight, targets[sl], lse[sl], None if e is None else ez[sl], g[sl],
                                None if e is None else e[sl], ctx.scale, dz)
                _grad_gemms(dz, hidden[sl], weight, None if grad_h is None else grad_h[sl], grad_w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None
