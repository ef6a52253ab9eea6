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
reference of what the kernels compute. "triton" tiles over the vocabulary; its forward keeps an online
log-sum-exp per token, over vocab tiles: m' = max(m, max_tile z), s' = s exp(m - m') + sum_tile exp(z - m'),
and likewise for sum p z; its backward recomputes logit tiles and accumulates both gradients in fp32 with
atomics (not bitwise deterministic across runs). "auto" = triton for CUDA tensors when triton imports, torch
otherwise. Its tile sizes depend on the GPU architecture (tiles_for: each must fit the architecture's shared
memory; tests/test_triton_aot.py compiles every kernel for sm_80, sm_89 and sm_90 without a GPU). Under fake
tensors (torch's FakeTensorMode, for memory estimates) it allocates its buffers and launches nothing. Under
TRITON_INTERPRET=1 (set before triton is imported) backend="triton" also takes CPU tensors; that is how
tests/test_fused_logprob.py checks the kernels.

For the caller (FSDP2): the lm_head weight is a DTensor shard between forward methods. Compute log-probs
inside a model method registered with torch.distributed.fsdp.register_fsdp_forward_method(model, name):
there the weight is the unsharded full Parameter (pass that Parameter itself: it is what this function
saves for backward; a copy would stay alive until backward), and its gradient lands back as a DTensor.
Tied embeddings work the same way (pass the embedding weight).
"""
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    triton = None

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
        backend = "triton" if hidden.is_cuda and triton is not None else "torch"
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


# --- triton backend: tiles over the vocabulary --------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_h: int  # hidden (reduction) step of each tl.dot
    group_n: int  # token blocks per group in the backward's program order (L2 reuse)
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads in the H loop

    @property
    def options(self):
        """The launch options (beside the constexprs) of a kernel launched with these tiles."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# Tiles per GPU architecture, not autotuned (no GPU here): each must fit the architecture's shared memory per
# block (sm_80 A100: 166,912 B; sm_89 L4/L40S/RTX 4090: 101,376 B; sm_90 H100/H200: 232,448 B), or the first
# launch fails. tests/test_triton_aot.py compiles every (architecture, dtype, kernel) the launchers can produce
# and checks that; the bytes below are what it measured (triton 3.9) for aligned launches (16-byte aligned
# tensors, H a multiple of 16: every real model). Unaligned ones (an H like the tests' 40, a view at an odd
# offset) load element by element: at most 96 KB of shared memory, but up to 1.4 KB of spill per thread.
# num_stages=S keeps S-1 buffers of each pipelined load of the H loops in shared memory (h and W elements: 2 B
# at 16 bits), and tl.dot reads some fp32 operands (the .to(float32) of _mma) from shared memory too.
#
# 16-bit forward, every architecture: each program owns 128 tokens and streams all of W (programs run in token
# order and sweep W in the same vocabulary order, so concurrent programs share W tiles in L2); a 128x128 fp32
# accumulator over 8 warps is 64 registers/thread. 2 buffers x (128+128) x 64 x 2 B = 64 KB (sm_80/89), plus
# the fp32 W tile that sm_90's tf32 wgmma reads, 64 x 128 x 4 B = 32 KB: 96 KB. 221-255 registers, 0-24 B of
# spill per thread.
_FWD_16 = Tiles(block_n=128, block_v=128, block_h=64, group_n=1, num_warps=8, num_stages=3)
# 16-bit backward: keeps dz (fp32) alive across the H loop plus two accumulators, so 64 tokens x 128 vocab to
# stay under 255 registers/thread; GROUP_N=8 token blocks walk the vocabulary together so each W tile is read
# from HBM once per group and the group's 8 hidden blocks stay resident in L2. With both gradients, dz and dz^T
# as fp32 dot operands take 2 x 64 x 128 x 4 B = 64 KB of shared memory whatever the H step; with both H loops'
# loads pipelined (num_stages=3) the kernel needs 144 KB (147,456 B): fits A100 and H100 (128-250 registers,
# no spill).
_BWD_16 = Tiles(block_n=64, block_v=128, block_h=64, group_n=8, num_warps=8, num_stages=3)
# ... but not sm_89's 99 KB. Same tile, program order and warps, with half the H step and one buffer per load:
# 64 KB + 2 loops x (64+128) x 32 x 2 B = 88 KB, measured 92 KB (94,208 B); 126-156 registers, 0-4 B of spill.
_BWD_16_99KB = Tiles(block_n=64, block_v=128, block_h=32, group_n=8, num_warps=8, num_stages=2)
# fp32 (tests, small models): "ieee" dots are FMA loops on every architecture (no tensor cores), which need more
# registers per tile; the 16-bit tiles spilled (10 KB of spill stores per thread in sm_80's forward) and
# did not fit sm_89 (forward 128 KB, backward 144 KB). Forward 64 x 128, H step 32: 2 x (64+128) x 32 x 4 B =
# 48 KB; backward H step 16: 40-64 KB. 0-16 B of spill on sm_80/89/90, so one set for all.
_FWD_32 = Tiles(block_n=64, block_v=128, block_h=32, group_n=1, num_warps=8, num_stages=3)
_BWD_32 = Tiles(block_n=64, block_v=128, block_h=16, group_n=8, num_warps=8, num_stages=3)


def tiles_for(capability, dtype):
    """(forward, backward) Tiles for a GPU of compute capability (major, minor) and the inputs' dtype.

    Every architecture other than sm_80 and sm_90 gets sm_89's set, the one that fits the smallest shared
    memory of the GPUs triton targets: 99 KB per block on sm_86 (A10, RTX 3090), sm_89 and sm_120 (RTX 5090).
    Compiled once ahead of time (not in the test): the backward takes 92 KB on sm_86 and sm_120, the forward
    64 KB; both fit sm_100's (B200) 227 KB."""
    if dtype == torch.float32:
        return _FWD_32, _BWD_32
    if tuple(capability) in ((8, 0), (9, 0)):
        return _FWD_16, _BWD_16
    return _FWD_16, _BWD_16_99KB


if triton is not None:
    @triton.jit
    def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
        # acc + a @ b with fp32 accumulation. Operands go to fp32 first: the interpreter multiplies bf16 bit
        # patterns in tl.dot (triton#11584), and a bf16/fp16 value is exact in tf32, so with "tf32" the GPU's
        # products equal a 16-bit MMA's exactly and match the interpreter (which does fp32). fp32 inputs
        # use "ieee" so that they are not rounded to tf32. Same code on both, no interpreter branch.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < H),
                        other=0.0)  # [BN, BH]; masked H tail adds 0
            w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < H),
                        other=0.0)  # [BV, BH]
            acc = _mma(h, tl.trans(w), acc, DOT_PRECISION)
        return acc * scale  # [BN, BV] z; 0 on rows >= N and columns >= V

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, t_ptr, logp_ptr, lse_ptr, ez_ptr, ent_ptr, N, V, H, scale, ignore_index,
                    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*H may pass 2^31
        row_ok = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)  # [BN]
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
        s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(z - m)
        pz = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(z - m) * z
        zt = tl.zeros((BLOCK_N,), tl.float32)  # target logit
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, scale, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            z_max = tl.where((cols < V)[None, :], z, float("-inf"))  # vocab tail takes no probability
            m_new = tl.maximum(m, tl.max(z_max, axis=1))  # finite: every tile has a column < V
            alpha = tl.exp(m - m_new)  # rescales the old sums to the new max (0 on the first tile)
            ex = tl.exp(z_max - m_new[:, None])  # [BN, BV]
            s = s * alpha + tl.sum(ex, axis=1)
            if WITH_ENTROPY:
                pz = pz * alpha + tl.sum(ex * z, axis=1)  # z is finite (0) on the tail, ex is 0 there
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m = m_new
        lse = m + tl.log(s)
        valid = row_ok & (tgt != ignore_index)
        tl.store(logp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        if WITH_ENTROPY:
            ez = pz / s
            tl.store(ez_ptr + rows, ez, mask=row_ok)
            tl.store(ent_ptr + rows, tl.where(valid, lse - ez, 0.0), mask=row_ok)

    @triton.jit
    def _bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ez_ptr, g_ptr, e_ptr, gh_ptr, gw_ptr, N, V, H, scale,
                    ignore_index, WITH_ENTROPY: tl.constexpr, NEED_GH: tl.constexpr, NEED_GW: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        # One program per (token block, vocab tile): recompute the logit tile, form dz, then add dz @ W_tile
        # into grad_h and dz^T @ h_block into grad_w with fp32 atomics. Why atomics: the alternative without
        # them (one kernel per gradient, each owning its output rows) recomputes the logits twice, 10NVH
        # instead of 8NVH FLOPs in forward+backward. The price: fp32 sums in a run-dependent order (not
        # bitwise deterministic); the fp32 buffers are [N, H] and [V, H], never [N, V].
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_v = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_N * num_v  # programs in a group of GROUP_N token blocks x all vocab tiles
        first_n = (pid // per_group) * GROUP_N
        group_size = tl.minimum(num_n - first_n, GROUP_N)  # the last group may be short
        pid_n = first_n + (pid % per_group) % group_size  # token block varies fastest: W tile reused
        pid_v = (pid % per_group) // group_size
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        row_ok = rows < N
        col_ok = cols < V
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)  # [BN]
        valid = row_ok & (tgt != ignore_index)
        g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)  # [BN]
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # [BN]
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, scale, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # [BN, BV] softmax, 0 on the tail
        if WITH_ENTROPY:
            e = tl.where(valid, tl.load(e_ptr + rows, mask=row_ok, other=0.0), 0.0)  # [BN]
            ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)  # [BN]
            dz = -p * (g[:, None] + e[:, None] * (z - ez[:, None]))
        else:
            dz = -p * g[:, None]
        dz += tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0)  # + g at the target
        # chain rule through z = x / T; rounded to the input dtype like a native 16-bit kernel's MMA operand
        dz = (dz * scale).to(h_ptr.dtype.element_ty)  # [BN, BV]
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            if NEED_GH:
                w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dh = _mma(dz, w, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), DOT_PRECISION)  # [BN, BH]
                tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :],
                              sem="relaxed")
            if NEED_GW:
                h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dw = _mma(tl.trans(dz), h, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), DOT_PRECISION)  # [BV, BH]
                tl.atomic_add(gw_ptr + cols[:, None] * H + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :],
                              sem="relaxed")

    from triton.runtime.interpreter import InterpretedFunction
    _INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 was set at import


def _check_triton_inputs(hidden, weight):
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch' or 'auto'")
    if not hidden.is_cuda and not _INTERPRETED and not is_fake(hidden):  # fake: allocations only, no launch
        raise ValueError("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                         "triton is imported (or fake tensors)")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backend='triton' needs hidden and weight of one dtype in fp32/bf16/fp16, got "
                         f"{hidden.dtype}, {weight.dtype}")


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # see _mma


# The constexprs of each kernel, from the tiles and the call: one place for the launchers below and for
# tests/_triton_aot_worker.py, which compiles the same specializations ahead of time for sm_80/89/90.
def _fwd_constexprs(t, dtype, with_entropy):
    return dict(WITH_ENTROPY=with_entropy, BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h,
                DOT_PRECISION=_dot_precision(dtype))


def _bwd_constexprs(t, dtype, with_entropy, need_h, need_w):
    return dict(WITH_ENTROPY=with_entropy, NEED_GH=need_h, NEED_GW=need_w, BLOCK_N=t.block_n, BLOCK_V=t.block_v,
                BLOCK_H=t.block_h, GROUP_N=t.group_n, DOT_PRECISION=_dot_precision(dtype))


def _capability(device):
    """The (major, minor) compute capability the kernels are launched for; the interpreter runs sm_90's tiles."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


class _TritonLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, with_entropy):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        (n, h), v = hidden.shape, weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)  # [N], [N]
        ez = torch.empty(n, **f32) if with_entropy else None  # [N] E_p[z]
        ent = torch.empty(n, **f32) if with_entropy else None  # [N]
        if n > 0 and not is_fake(hidden):  # fake tensors (memory estimates): the buffers above, no launch
            t = tiles_for(_capability(hidden.device), hidden.dtype)[0]
            _fwd_kernel[(triton.cdiv(n, t.block_n),)](
                hidden, weight, targets, logp, lse, ez if with_entropy else lse, ent if with_entropy else lse,
                n, v, h, scale, ignore_index, **_fwd_constexprs(t, hidden.dtype, with_entropy), **t.options)
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.scale, ctx.ignore_index, ctx.with_entropy = scale, ignore_index, with_entropy
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        (n, h), v = hidden.shape, weight.shape[0]
        g, e = _upstream(grads, ctx.with_entropy, targets != ctx.ignore_index)  # [N], [N] or None
        gh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_h else None  # [N, H]
        gw = torch.zeros((v, h), dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        if n > 0 and (need_h or need_w) and not is_fake(hidden):
            t = tiles_for(_capability(hidden.device), hidden.dtype)[1]
            grid = (triton.cdiv(n, t.block_n) * triton.cdiv(v, t.block_v),)
            _bwd_kernel[grid](
                hidden, weight, targets, lse, ez if e is not None else lse, g, e if e is not None else g,
                gh if need_h else lse, gw if need_w else lse, n, v, h, ctx.scale, ctx.ignore_index,
                **_bwd_constexprs(t, hidden.dtype, e is not None, need_h, need_w), **t.options)
        grad_h = None if gh is None else gh.to(hidden.dtype)
        grad_w = None if gw is None else gw.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None
