"""fused_logprob against a naive full-logits reference (autograd on log_softmax + gather).

The Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before triton is
imported, so it is set here before fused_logprob is imported. Shapes are small because the interpreter is slow.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fused_logprob  # noqa: E402
import triton_logprob  # noqa: E402
from fused_logprob import fused_logprobs  # noqa: E402
from triton_logprob import Tiles  # noqa: E402

IGNORE = -100
# several token blocks, vocabulary slices and tiles, H steps on these shapes, and a short last group of blocks
SMALL = Tiles(block_n=16, block_v=32, block_h=16, group_n=2, num_warps=4, num_stages=1)


def naive(hidden, weight, targets, temperature):
    """Full [N, V] fp32 logits: the reference the fused paths must equal."""
    z = hidden.float() @ weight.float().T / temperature  # [N, V]
    lp = torch.log_softmax(z, dim=-1)  # [N, V]
    valid = targets != IGNORE  # [N]
    logp = lp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)  # [N]
    ent = -(lp.exp() * lp).sum(-1)  # [N]
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def use_variant(monkeypatch, variant, n_rows_per_chunk=4, vocab=None):
    """Backend name for a test variant; patches chunk size / tile sizes where the variant asks for it."""
    if variant == "torch-chunked":  # 4 tokens per chunk: many chunks and a partial last one
        monkeypatch.setattr(fused_logprob, "CHUNK_BYTES", 4 * vocab * n_rows_per_chunk)
    if variant == "triton-small":  # and backward chunks of 16 tokens at the tests' V (several, a partial last)
        monkeypatch.setattr(triton_logprob, "tiles_for", lambda capability, dtype: ((SMALL,), (SMALL,)))
        monkeypatch.setattr(fused_logprob, "DZ_CHUNK_BYTES", 16 * 4 * (vocab or 128))
    return variant.split("-")[0]


def make_inputs(n, h, v, dtype, n_ignored, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:n_ignored]] = IGNORE
    targets[0] = v - 1  # a target in the last (partial) vocab tile
    return hidden, weight, targets, torch.randn(n, generator=gen), torch.randn(n, generator=gen)


def grads_of(fn, hidden, weight, targets, g_logp, g_ent, with_entropy):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn(h, w, targets)
    logp, ent = out if with_entropy else (out, None)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
    loss.backward()
    return logp, ent, h.grad, w.grad


def close(actual, expected, rel):
    """Elementwise |a - e| <= rel * max(1, max|e|) (+ rel * |e|): tolerances relative to the tensor's scale."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


# (N, H, V, temperature, ignored tokens, with entropy): V and H are multiples of no block size, N is odd / 1
CASES = {"odd": (37, 40, 300, 0.7, 5, True), "one_token": (1, 24, 257, 1.0, 0, False)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["torch", "torch-chunked", "triton", "triton-small"])
def test_matches_naive(monkeypatch, variant, dtype, case):
    n, h, v, temp, n_ignored, with_entropy = CASES[case]
    backend = use_variant(monkeypatch, variant, vocab=v)
    hidden, weight, targets, g_logp, g_ent = make_inputs(n, h, v, dtype, n_ignored)

    def fused(hh, ww, tt):
        return fused_logprobs(hh, ww, tt, temperature=temp, return_entropy=with_entropy, backend=backend)

    def ref(hh, ww, tt):
        logp, ent = naive(hh, ww, tt, temp)
        return (logp, ent) if with_entropy else logp

    logp, ent, gh, gw = grads_of(fused, hidden, weight, targets, g_logp, g_ent, with_entropy)
    # the reference sees the same (bf16-rounded) values, upcast: the fused paths do fp32 math on them
    r_logp, r_ent, r_gh, r_gw = grads_of(ref, hidden.float(), weight.float(), targets, g_logp, g_ent, with_entropy)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert gh.dtype == dtype and gw.dtype == dtype
    rel_val, rel_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)
    close(logp, r_logp, rel_val)
    close(gh, r_gh, rel_grad)
    close(gw, r_gw, rel_grad)
    if with_entropy:
        assert ent.dtype == torch.float32
        close(ent, r_ent, rel_val)
    ignored = targets == IGNORE
    assert ignored.sum() == n_ignored
    assert (logp[ignored] == 0).all() and (gh[ignored] == 0).all()  # exact zeros, not just small
    if with_entropy:
        assert (ent[ignored] == 0).all()


@pytest.mark.parametrize("variant", ["torch", "triton-small"])
def test_one_output_used_one_input_trained(monkeypatch, variant):
    """Gradient from the entropy alone (logp unused) into hidden only; and from logp alone into weight only."""
    backend = use_variant(monkeypatch, variant, vocab=100)
    hidden, weight, targets, g_logp, g_ent = make_inputs(19, 24, 100, torch.float32, 3, seed=1)
    temp = 1.3
    r_logp, r_ent = naive(hidden, weight.requires_grad_(), targets, temp)
    (r_gw_logp,) = torch.autograd.grad((r_logp * g_logp).sum(), weight)
    weight.requires_grad_(False)
    h = hidden.clone().requires_grad_()
    r_logp, r_ent = naive(h, weight, targets, temp)
    (r_gh_ent,) = torch.autograd.grad((r_ent * g_ent).sum(), h)

    _, ent = fused_logprobs(h, weight, targets, temperature=temp, return_entropy=True, backend=backend)
    (gh_ent,) = torch.autograd.grad((ent * g_ent).sum(), h)
    close(gh_ent, r_gh_ent, 1e-5)
    w = weight.clone().requires_grad_()
    logp, _ = fused_logprobs(hidden, w, targets, temperature=temp, return_entropy=True, backend=backend)
    (gw_logp,) = torch.autograd.grad((logp * g_logp).sum(), w)
    close(gw_logp, r_gw_logp, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_is_deterministic(monkeypatch, dtype):
    """Two backward passes over the same inputs give bitwise equal gradients: every dz element is written by one
    program and the GEMMs over chunks run in a fixed order. The interpreter runs programs one by one, so this
    alone would not catch atomics racing on a GPU; tests/test_triton_aot.py checks that the compiled kernels hold
    no atomic instruction."""
    use_variant(monkeypatch, "triton-small", vocab=300)
    hidden, weight, targets, g_logp, g_ent = make_inputs(37, 40, 300, dtype, 5, seed=3)

    def fused(hh, ww, tt):
        return fused_logprobs(hh, ww, tt, temperature=0.9, return_entropy=True, backend="triton")

    first = grads_of(fused, hidden, weight, targets, g_logp, g_ent, True)
    second = grads_of(fused, hidden, weight, targets, g_logp, g_ent, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[2].abs().sum() > 0 and first[3].abs().sum() > 0  # real gradients, not two zeros


def test_triton_noncontiguous_inputs(monkeypatch):
    use_variant(monkeypatch, "triton-small")
    hidden, weight, targets, g_logp, _ = make_inputs(20, 32, 90, torch.float32, 2, seed=2)
    base = torch.stack([hidden, -hidden], dim=2).flatten(1).requires_grad_()  # [N, 2H], hidden at even columns
    logp = fused_logprobs(base[:, ::2], weight, targets, backend="triton")  # strided view of the hidden
    logp.backward(g_logp)
    h = hidden.clone().requires_grad_()
    r_logp, _ = naive(h, weight, targets, 1.0)
    r_logp.backward(g_logp)
    close(logp, r_logp, 1e-5)
    close(base.grad[:, ::2], h.grad, 1e-5)
    assert (base.grad[:, 1::2] == 0).all()


def test_backend_choice_and_errors():
    hidden, weight, targets, _, _ = make_inputs(5, 8, 11, torch.float32, 1)
    logp = fused_logprobs(hidden.requires_grad_(), weight, targets)  # CPU tensors: "auto" is the torch path
    assert type(logp.grad_fn).__name__.startswith("_ChunkedLogProb")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        fused_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="targets outside"):
        fused_logprobs(hidden, weight, torch.full((5,), 11), backend="torch")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.max_bytes, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


def test_torch_backend_memory_bounded_by_chunk(monkeypatch):
    """No tensor the torch path creates grows with N*V: all stay within CHUNK_BYTES while the naive logits
    are 32x that. (H is tiny so the [V, H] weight-sized tensors also fit the budget.)"""
    v, h = 1024, 4
    chunk_bytes = 4 * v * 8  # 8 tokens of fp32 logits
    monkeypatch.setattr(fused_logprob, "CHUNK_BYTES", chunk_bytes)
    for n in (64, 256):
        hidden, weight, targets, g_logp, g_ent = make_inputs(n, h, v, torch.float32, 3)
        for fn, bound in ((fused_logprobs, chunk_bytes), (naive, None)):
            hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with LargestTensor() as probe:
                logp, ent = fn(hh, ww, targets, **({"return_entropy": True} if bound else {"temperature": 1.0}))
                ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
            if bound is None:
                assert probe.max_bytes >= 4 * n * v  # the probe sees the naive [N, V] logits
            else:
                assert "addmm_" in probe.ops  # the probe saw the backward too
                assert probe.max_bytes <= bound


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_tokens(backend):
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logp, ent = fused_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True,
                               backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0,)
    assert hidden.grad.shape == (0, 8) and (weight.grad == 0).all()


class NoLaunch:
    """Stands in for a Triton kernel that must not be launched."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched on fake tensors")


def without_kernels(monkeypatch):
    """As on a CPU machine without the interpreter, and any launch fails."""
    monkeypatch.setattr(triton_logprob, "_INTERPRETED", False)
    for name in ("_fwd_kernel", "_dz_kernel"):
        monkeypatch.setattr(triton_logprob, name, NoLaunch(name))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fake_tensors(monkeypatch, backend):
    """Under FakeTensorMode (benchmarks/memory.py's estimate) both paths run forward + backward without values:
    no host sync for the target check, and the Triton path allocates its buffers but launches no kernel (an
    interpreted launch would read the fake tensors' storage, and real kernels need a GPU). The shape would take
    the interpreter hours: this returns at once only because nothing is launched."""
    n, h, v = 4096, 512, 32000
    without_kernels(monkeypatch)
    monkeypatch.setattr(fused_logprob, "DZ_CHUNK_BYTES", 2 * v * 256)  # 256-token dz chunks, smaller than [V, H]
    with FakeTensorMode():
        hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(v, h, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, v, (n,))
        with LargestTensor() as probe:
            logp, ent = fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                                       backend=backend)
            (logp.sum() + ent.sum()).backward()
        logp_only = fused_logprobs(hidden, weight, targets, backend=backend)
    for t in (logp, ent, logp_only, hidden.grad, weight.grad):
        assert is_fake(t)
    assert logp.shape == ent.shape == logp_only.shape == (n,)
    assert logp.dtype == ent.dtype == torch.float32
    assert hidden.grad.shape == (n, h) and hidden.grad.dtype == torch.bfloat16
    assert weight.grad.shape == (v, h) and weight.grad.dtype == torch.bfloat16
    assert probe.max_bytes < 4 * n * v  # memory accounting sees no [N, V] logits
    if backend == "triton":  # ... and does see the Triton path's fp32 [V, H] grad accumulator
        assert probe.max_bytes == 4 * v * h
    # the real (non-fake) path still checks the targets' values
    monkeypatch.undo()
    hidden, weight, targets, _, _ = make_inputs(5, 8, 11, torch.float32, 1)
    for bad in (11, -1):
        with pytest.raises(ValueError, match="targets outside"):
            fused_logprobs(hidden, weight, torch.tensor([0, 1, bad, 2, IGNORE]), backend=backend)


class Allocations(TorchDispatchMode):
    """Records (op, shape, dtype) of every non-empty tensor an allocating or casting aten op returns."""
    OPS = {"empty", "empty_like", "empty_strided", "new_empty", "zeros", "zeros_like", "new_zeros", "full",
           "full_like", "ones_like", "clone", "_to_copy"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.OPS and isinstance(out, torch.Tensor) and out.numel() > 0:
            self.seen.append((func.__name__.split(".")[0], tuple(out.shape), out.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_triton_path_allocates_what_the_real_one_does(monkeypatch, dtype):
    """The fake Triton path's allocations equal those of a real (interpreted) run, op for op: the forward's
    vocabulary-slice partials, dh, the fp32 dW accumulator, one dz chunk buffer and the cast of dW to the input
    dtype; only the CPU-only upcasts of the GEMM operands (no out_dtype GEMMs on CPU) are not in the fake run."""
    use_variant(monkeypatch, "triton-small")
    n, h, v = 20, 32, 90
    hidden, weight, targets, _, _ = make_inputs(n, h, v, dtype, 2)

    def fwd_bwd(hh, ww, tt):
        logp, ent = fused_logprobs(hh.requires_grad_(), ww.requires_grad_(), tt, return_entropy=True,
                                   backend="triton")
        (logp.sum() + ent.sum()).backward()

    with Allocations() as real:
        fwd_bwd(hidden, weight, targets)
    without_kernels(monkeypatch)
    with FakeTensorMode() as mode:
        fake_inputs = [mode.from_tensor(t) for t in (hidden, weight, targets)]
        with Allocations() as fake:
            fwd_bwd(*fake_inputs)
    f32 = torch.float32
    rows = min(n, fused_logprob.DZ_CHUNK_BYTES // (v * weight.element_size()))  # tokens per backward chunk
    splits = triton_logprob.num_splits(n, v, SMALL.block_n, SMALL.block_v, triton_logprob.INTERPRETER_SMS)[0]
    expected = [("empty", (4, splits, n), f32), ("ones_like", (), f32)]  # the forward's partials; d(sum)/d(sum)
    expected += [("empty_like", (n, h), dtype), ("zeros", (v, h), f32), ("empty", (rows, v), dtype)]  # dh, dW, dz
    cpu_upcasts = []  # torch's CPU GEMMs have no out_dtype: the real interpreted run upcasts dz and h per chunk
    if dtype != f32:
        for s in range(0, n, rows):
            c = min(rows, n - s)
            cpu_upcasts += [("_to_copy", (v, c), f32), ("_to_copy", (c, h), f32)]
        expected_tail = [("_to_copy", (v, h), dtype)]  # the returned weight gradient in the input dtype
    else:
        expected_tail = []
    assert real.seen == expected + cpu_upcasts + expected_tail
    assert fake.seen == expected + expected_tail
