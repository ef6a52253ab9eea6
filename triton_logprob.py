"""Triton kernels of fused_logprob's "triton" backend: the forward split over tokens and vocabulary, and the logit
gradients of one token chunk for the backward. fused_logprob.py holds the autograd Function, the math and the
two gradient GEMMs; this file holds what runs on the GPU and the tiles it runs with.

Per token n (h_n [H], W [V, H], scale = 1/T): z_nv = scale * (h_n . W_v).
Forward, _fwd_kernel: program (token block b, vocabulary slice k) reduces z over the columns of slice k to
    m_k = max_v z,   s_k = sum_v exp(z - m_k),   q_k = sum_v exp(z - m_k) z
with an online update over its vocabulary tiles (m' = max(m, max_tile z), s' = s exp(m - m') + sum_tile exp(z - m'),
likewise q). combine() merges the slices: M = max_k m_k, lse = M + log sum_k s_k exp(m_k - M),
E_p[z] = sum_k q_k exp(m_k - M) / sum_k s_k exp(m_k - M). The target logit z_target is written once per token, by
the slice-0 program (a gather-dot, not a tile scan).
Backward, _dz_kernel, for the rows of one token chunk (g = dL/dlogp, e = dL/dent, both 0 on ignored tokens):
    dz_nv = scale * (g_n (1[v = t_n] - p_nv) - e_n p_nv (z_nv - E_p[z]_n)),   p_nv = exp(z_nv - lse_n)
stored in the inputs' dtype; dh = dz @ W and dW += dz^T @ h are torch GEMMs (fused_logprob._grad_gemms). No
atomics anywhere: every output element is written by exactly one program, once, so a launch is deterministic and
can be repeated (autotuning re-runs launches and needs no reset).

MMAs: 16-bit inputs go to tl.dot as they are (bf16/fp16 MMA, fp32 accumulation); fp32 inputs use "tf32x3" (three
tf32 MMAs, about fp32 accuracy). Only under TRITON_INTERPRET=1 are the operands upcast to fp32 first (UPCAST, a
constexpr): the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584). A 16-bit product is exact in
fp32, so the interpreter computes the same math the GPU's MMA does.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.interpreter import InterpretedFunction

AUTOTUNE = True  # on CUDA, time every candidate of tiles_for once per key and keep the fastest (see _tuned)
INTERPRETER_SMS = 8  # the "SM count" the split rule assumes under the interpreter (several slices on test shapes)


@dataclass(frozen=True)
class Tiles:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile (a power of two: the vocabulary slices are multiples of it)
    block_h: int  # hidden (reduction) step of each tl.dot
    group_n: int  # token blocks that walk the vocabulary together (L2 reuse of their W tiles)
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads in the H loop

    @property
    def options(self):
        """The launch options (beside the constexprs) of a kernel launched with these tiles."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def meta(self):
        """The tile constexprs of both kernels."""
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h, GROUP_N=self.group_n)


T = Tiles
# Candidates per (architecture, kernel, inputs): the first is the default (no autotuning: the interpreter, or
# AUTOTUNE off); on CUDA all are timed. Each one compiles for its architecture, fits its shared memory and, for
# 16-bit inputs, lowers to MMAs of the inputs' dtype (wgmma on sm_90, mma.sync on sm_8x) without register
# spills: tests/test_triton_aot.py checks every one (the bytes, registers and MMA kinds are in the README). Not
# timed on any GPU yet. The candidates of one list share block_h and the forward's share block_v, so each logit
# and each slice's reduction runs in the same order whichever one autotuning picks.
# sm_90 (H100/H200, 227 KB): 128 x 128 tiles over two warpgroups (wgmma m64n128k16), four stages of h and W tiles
# or three in smaller groups; the logit-gradient kernel also tries 128 x 256 (three stages). The forward's
# 128 x 256 tile spilled about 400 B per thread with entropy (the exp tile beside the accumulator), 16 warps too.
_SM90_FWD = (T(128, 128, 64, 8, 8, 4), T(128, 128, 64, 4, 8, 3))
_SM90_DZ = (T(128, 128, 64, 8, 8, 4), T(128, 256, 64, 8, 8, 3))
# sm_80 (A100, 163 KB): mma.sync m16n8k16 tiles; 128 x 128 over 8 warps, or 4 warps with a deeper pipeline (64
# tokens in the forward: its 128 x 128 tile over 4 warps spilled 628 B per thread).
_SM80_FWD = (T(128, 128, 64, 8, 8, 3), T(64, 128, 64, 8, 4, 4))
_SM80_DZ = (T(128, 128, 64, 8, 8, 3), T(128, 128, 64, 8, 4, 4))
# sm_89 and every other architecture (99 KB on sm_86/sm_89/sm_120): 128 x 128 tiles with two stages.
_SM89_16 = (T(128, 128, 64, 8, 8, 2), T(64, 128, 64, 8, 4, 3))
# fp32 inputs (tests, small models): tf32x3 (three tf32 MMAs per product) needs more registers per tile; 64 x 128
# spilled 400-900 B per thread on sm_80/89, 64 x 64 spills nothing on sm_80/89/90.
_FP32 = (T(64, 64, 32, 8, 4, 3),)
FWD_TILES = {"sm90": _SM90_FWD, "sm80": _SM80_FWD, "sm89": _SM89_16}
DZ_TILES = {"sm90": _SM90_DZ, "sm80": _SM80_DZ, "sm89": _SM89_16}


def tiles_for(capability, dtype):
    """(forward candidates, logit-gradient candidates) for a GPU of compute capability (major, minor) and the
    inputs' dtype. Architectures other than sm_80 and sm_90 get sm_89's, which fit the smallest shared memory
    (99 KB per block) of the GPUs triton targets."""
    if dtype == torch.float32:
        return _FP32, _FP32
    arch = {(8, 0): "sm80", (9, 0): "sm90"}.get(tuple(capability), "sm89")
    return FWD_TILES[arch], DZ_TILES[arch]


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation: a native MMA of the operands' dtype, or fp32 operands under the interpreter."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, row0, col0, N, V, H, scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z[i, j] = scale * sum_k h[row0 + i, k] W[col0 + j, k]  ([BN, BV] fp32; 0 on rows >= N and columns >= V).
    64-bit block bases, 32-bit offsets inside a block (BN*H and BV*H are far below 2^31): fewer address registers."""
    h_blk = h_ptr + tl.cast(row0, tl.int64) * H  # tl.cast: col0 is a plain int in the interpreter's loops
    w_blk = w_ptr + tl.cast(col0, tl.int64) * H
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    r_ok = r < N - row0
    c_ok = c < V - col0
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_blk + r[:, None] * H + ks[None, :], mask=r_ok[:, None] & (ks[None, :] < H),
                    other=0.0)  # [BN, BH]; a masked H tail adds 0
        w = tl.load(w_blk + c[:, None] * H + ks[None, :], mask=c_ok[:, None] & (ks[None, :] < H),
                    other=0.0)  # [BV, BH]
        acc = _mma(h, tl.trans(w), acc, UPCAST, DOT_PRECISION)
    return acc * scale


@triton.jit
def _grouped(pid, num_n, num_other, GROUP_N: tl.constexpr):
    """pid -> (token block, other index). Groups of GROUP_N token blocks walk `other` (vocabulary slices or tiles)
    together, token block fastest: programs running at once share a few h blocks and a few W tiles in L2."""
    per_group = GROUP_N * num_other
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)  # the last group may be short
    return first_n + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _target_logits(h_ptr, w_ptr, rows, row_ok, tgt, V, H, scale, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """scale * sum_k h[rows, k] W[tgt, k]  [BN] fp32, a row-wise gather-dot (0 where tgt is outside [0, V)). Apart
    from the tile loop: an index compare over every [BN, BV] tile costs about 50 registers per thread there."""
    t_ok = row_ok & (tgt >= 0) & (tgt < V)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < H),
                    other=0.0)  # [BN, BH]
        w = tl.load(w_ptr + tgt[:, None] * H + ks[None, :], mask=t_ok[:, None] & (ks[None, :] < H),
                    other=0.0)  # [BN, BH] the target rows of W
        acc += h.to(tl.float32) * w.to(tl.float32)
    return tl.sum(acc, axis=1) * scale


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, q_ptr, zt_ptr, N, V, H, SPLIT_V, NUM_SPLITS, N_BUCKET, scale,
                WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                GROUP_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial m_k, s_k, (q_k,) t_k of one (token block, vocabulary slice of SPLIT_V columns), stored at [k, rows]
    (module docstring). N_BUCKET is only an autotuning key."""
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), NUM_SPLITS, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int32: N is an int32 argument
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)  # [BN]; an ignored target is masked later (combine)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(z - m)
    q = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(z - m) * z
    c = tl.arange(0, BLOCK_V)  # int32 column offsets inside a tile: no 64-bit [BN, BV] index tensors
    v_lo = pid_k * SPLIT_V
    for v0 in range(v_lo, tl.minimum(v_lo + SPLIT_V, V), BLOCK_V):
        z = _logits_tile(h_ptr, w_ptr, pid_n * BLOCK_N, v0, N, V, H, scale, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST,
                         DOT_PRECISION)
        z_max = tl.where((c < V - v0)[None, :], z, float("-inf"))  # the vocabulary tail takes no probability
        m_new = tl.maximum(m, tl.max(z_max, axis=1))  # finite: every tile has a column < V
        alpha = tl.exp(m - m_new)  # rescales the old sums to the new max (0 on the first tile)
        ex = tl.exp(z_max - m_new[:, None])  # [BN, BV]
        s = s * alpha + tl.sum(ex, axis=1)
        if WITH_ENTROPY:
            q = q * alpha + tl.sum(ex * z, axis=1)  # z is finite (0) on the tail, ex is 0 there
        m = m_new
    out = pid_k.to(tl.int64) * N + rows  # [S, N] partials
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(q_ptr + out, q, mask=row_ok)
    if pid_k == 0:  # the target logits, once per token
        zt = _target_logits(h_ptr, w_ptr, rows, row_ok, tgt, V, H, scale, BLOCK_N, BLOCK_H)
        tl.store(zt_ptr + rows, zt, mask=row_ok)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ez_ptr, g_ptr, e_ptr, dz_ptr, N, V, H, N_BUCKET, scale,
               WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               GROUP_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dz [N, V] of one token chunk in dz's dtype (module docstring); g and e are 0 on ignored tokens."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    row0, col0 = pid_n * BLOCK_N, pid_v * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)  # int32: N and V are int32 arguments
    c = tl.arange(0, BLOCK_V)  # int32 column offsets inside the tile
    row_ok = rows < N
    c_ok = c < V - col0
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)  # [BN]
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # [BN]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # [BN]
    z = _logits_tile(h_ptr, w_ptr, row0, col0, N, V, H, scale, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
    p = tl.where(c_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # [BN, BV] softmax, 0 on the tail
    if WITH_ENTROPY:
        e = tl.load(e_ptr + rows, mask=row_ok, other=0.0)  # [BN]
        ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)  # [BN]
        dz = -p * (g[:, None] + e[:, None] * (z - ez[:, None]))
    else:
        dz = -p * g[:, None]
    t_in_tile = (tgt - col0).to(tl.int32)  # [BN] in [0, BV) only if the target is in this tile
    dz += tl.where(c[None, :] == t_in_tile[:, None], g[:, None], 0.0)  # + g at the target
    dz_blk = dz_ptr + row0.to(tl.int64) * V + col0  # 64-bit block base, 32-bit offsets (BN*V < 2^31)
    tl.store(dz_blk + (rows - row0)[:, None] * V + c[None, :], (dz * scale).to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & c_ok[None, :])


_INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 was set before triton's import


def dot_precision(dtype):
    """tl.dot's input_precision: "tf32x3" for fp32 inputs (not rounded to tf32), irrelevant for 16-bit ones."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def constexprs(tiles, dtype, with_entropy, upcast=False):
    """The constexprs of either kernel: one place for the launchers and for tests/_triton_aot_worker.py."""
    return dict(WITH_ENTROPY=with_entropy, **tiles.meta, UPCAST=upcast, DOT_PRECISION=dot_precision(dtype))


def n_bucket(n):
    """The token-count bucket of the autotuning key: the power of two >= n, within [1024, 65536]."""
    return min(65536, max(1024, triton.next_power_of_2(max(n, 1))))


def _device_info(tensor):
    """(compute capability, SM count) the kernels are sized for: the GPU's; the interpreter and fake tensors (memory
    estimates, where nothing is launched and no GPU need exist) get sm_90's tiles on INTERPRETER_SMS "SMs"."""
    if tensor.device.type != "cuda" or is_fake(tensor):
        return (9, 0), INTERPRETER_SMS
    props = torch.cuda.get_device_properties(tensor.device)
    return (props.major, props.minor), props.multi_processor_count


@functools.lru_cache(maxsize=None)
def _tuned(kernel, candidates):
    """kernel wrapped in triton.autotune over the candidates, keyed on H, V, the token bucket and the dtypes (which
    triton adds to every key). The kernels only store (no accumulation), so re-running a launch to time it needs no
    reset; cache_results keeps a key's pick on disk, so later processes reuse it."""
    configs = [triton.Config(t.meta, num_warps=t.num_warps, num_stages=t.num_stages) for t in candidates]
    return triton.autotune(configs=configs, key=["H", "V", "N_BUCKET"], cache_results=True)(kernel)


def _launch(kernel, candidates, grid_of, args, dtype, with_entropy, device):
    """Launch with the default tiles, or autotuned on CUDA. grid_of(tiles_meta) -> grid."""
    if device.type == "cuda" and AUTOTUNE and len(candidates) > 1:
        fixed = dict(WITH_ENTROPY=with_entropy, UPCAST=False, DOT_PRECISION=dot_precision(dtype))
        _tuned(kernel, candidates)[lambda meta: grid_of(meta["BLOCK_N"], meta["BLOCK_V"])](*args, **fixed)
        return
    t = candidates[0]
    kernel[grid_of(t.block_n, t.block_v)](*args, **constexprs(t, dtype, with_entropy, _INTERPRETED), **t.options)


def num_splits(n, v, block_n, granule, sms):
    """(slices, columns per slice): the vocabulary cut into slices of a multiple of `granule` columns. Enough
    (token block x slice) programs for two waves over the SMs, and at least sqrt(SMs) slices so that the programs
    running at once share few h blocks and W tiles (about SMs/slices + slices of each, minimal at sqrt(SMs))."""
    want = max(triton.cdiv(2 * sms, max(1, triton.cdiv(n, block_n))), int(sms ** 0.5 + 0.999))
    split_v = triton.cdiv(triton.cdiv(v, want), granule) * granule
    return triton.cdiv(v, split_v), split_v


def forward(hidden, weight, targets, scale, with_entropy):
    """-> lse [N], target logit [N], E_p[z] [N] (or None), fp32: the split kernel, then combine. Inputs contiguous.
    Under fake tensors (memory estimates) the buffers are allocated and nothing is launched."""
    (n, h), v = hidden.shape, weight.shape[0]
    capability, sms = _device_info(hidden)
    candidates = tiles_for(capability, hidden.dtype)[0]
    tuned = hidden.is_cuda and AUTOTUNE and len(candidates) > 1
    granule = max(t.block_v for t in candidates) if tuned else candidates[0].block_v
    splits, split_v = num_splits(n, v, candidates[0].block_n, granule, sms)
    part = torch.empty((4 if with_entropy else 3, splits, n), dtype=torch.float32, device=hidden.device)
    if n > 0 and not is_fake(hidden):
        args = (hidden, weight, targets, part[0], part[1], part[-1], part[2], n, v, h, split_v, splits, n_bucket(n),
                scale)
        _launch(_fwd_kernel, candidates, lambda bn, bv: (triton.cdiv(n, bn) * splits,), args, hidden.dtype,
                with_entropy, hidden.device)
    return combine(part, with_entropy)


def combine(part, with_entropy):
    """Merge the slices' partials part = [m, s, t(, q)] (each [S, N]; t only in slice 0) -> lse, z_target, E_p[z]
    (module docstring)."""
    m_max = part[0].amax(dim=0)  # [N]
    w = torch.exp(part[0] - m_max)  # [S, N]
    s = (part[1] * w).sum(dim=0)  # [N]
    lse = m_max + torch.log(s)  # [N]
    ez = (part[3] * w).sum(dim=0) / s if with_entropy else None  # [N]
    return lse, part[2, 0], ez


def logit_grads(hidden, weight, targets, lse, ez, g, e, scale, dz):
    """Write dz [C, V] (dz's dtype) for the C tokens of one chunk; e and ez are None without an entropy gradient.
    Every tensor is this chunk's rows only, contiguous. Under fake tensors nothing is launched."""
    (n, h), v = hidden.shape, weight.shape[0]
    if n == 0 or is_fake(hidden):
        return
    capability, _ = _device_info(hidden)
    candidates = tiles_for(capability, hidden.dtype)[1]
    with_entropy = e is not None
    args = (hidden, weight, targets, lse, ez if with_entropy else lse, g, e if with_entropy else g, dz, n, v, h,
            n_bucket(n), scale)
    _launch(_dz_kernel, candidates, lambda bn, bv: (triton.cdiv(n, bn) * triton.cdiv(v, bv),), args, hidden.dtype,
            with_entropy, hidden.device)
