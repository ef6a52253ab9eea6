"""loss.py against independent references: per-element Python loops with hand-derived derivatives.

Every per-token loss l is elementwise, so autograd of sum(w * l) with random weights w must equal
w * dl/dlogp, which the references below write out by hand.
"""

import math

import pytest
import torch

from loss import (
    group_advantages,
    kl_k3,
    masked_mean,
    off_policy_grpo_token_loss,
    on_policy_grpo_token_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    sft_token_loss,
    token_mean,
)

B, T, EPS, BETA = 6, 5, 0.2, 0.1


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.empty(B, T).uniform_(0.02, 1.0, generator=g)  # spans p < 1-eps and p > 1-eps
    logp = p.log().requires_grad_(True)
    old_logp = (logp.detach() + 0.5 * torch.randn(B, T, generator=g)).requires_grad_(True)  # ratios beyond clip
    ref_logp = (logp.detach() + torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    w = torch.rand(B, T, generator=g)
    return logp, old_logp, ref_logp, adv, w


def _grad(loss_tt, logp, w):
    return torch.autograd.grad((w * loss_tt).sum(), logp)[0]


def _close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


def _loop(fn, *tensors):
    """Apply a scalar function (value, d/dlogp) elementwise over [B, T] tensors -> two nested lists."""
    rows = [[fn(*(x[b, t].item() for x in tensors)) for t in range(T)] for b in range(B)]
    return [[v for v, _ in r] for r in rows], [[d for _, d in r] for r in rows]


def _k3_ref(lp, ref):
    return math.exp(ref - lp) - (ref - lp) - 1, 1 - math.exp(ref - lp)


# --- advantages -----------------------------------------------------------------------------------


def _adv_ref(rewards, G, scale_by_std=True, bias=0.0, eps=1e-6):
    out = []
    for s in range(0, len(rewards), G):
        grp = rewards[s : s + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (G - 1))
        for r in grp:
            a = (r - mean) / (std + eps) if scale_by_std else r - mean
            out.append(a + (bias if all(x > 0 for x in grp) else 0.0))
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_group_advantages_random(scale_by_std, bias):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(12, generator=g) - 0.3  # some groups all positive, some not
    rewards[:4] = torch.rand(4, generator=g) + 0.1  # group 0 is all positive for sure
    got = group_advantages(rewards, 4, scale_by_std=scale_by_std, all_positive_bias=bias)
    _close(got, _adv_ref(rewards.tolist(), 4, scale_by_std, bias))


def test_group_advantages_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> A = +-0.5*sqrt(3); group [1, 1, 1, 1]: A = 0 + b
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), 4, all_positive_bias=0.5)
    h = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    _close(adv, [h, -h, -h, h, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, scale_by_std=False)
    _close(adv, [0.5, -0.5, -0.5, 0.5])


def test_bias_only_on_all_positive_groups_and_exactly_b_for_binary():
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 1, 1])  # mixed, all-zero, all-positive
    plain = group_advantages(rewards, 3)
    biased = group_advantages(rewards, 3, all_positive_bias=0.3)
    _close(biased - plain, [0, 0, 0, 0, 0, 0, 0.3, 0.3, 0.3])
    _close(biased[6:], [0.3, 0.3, 0.3])  # 0/1 rewards: the all-positive group gets exactly b
    _close(group_advantages(rewards, 3, scale_by_std=False, all_positive_bias=0.3)[6:], [0.3] * 3)


def test_zero_bias_equals_plain_off_policy_grpo():
    logp, _, _, _, _ = _inputs()
    rewards = torch.tensor([1.0, 0, 1, 1, 1, 1])
    a0 = group_advantages(rewards, 3, all_positive_bias=0.0)
    torch.testing.assert_close(a0, group_advantages(rewards, 3))
    plain = off_policy_grpo_token_loss(logp, group_advantages(rewards, 3))
    torch.testing.assert_close(off_policy_grpo_token_loss(logp, a0), plain)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1)
    _close(group_advantages(torch.tensor([1.0, 0.0]), 1, scale_by_std=False), [0.0, 0.0])


# --- k3 and SFT ------------------------------------------------------------------------------------


def test_kl_k3_value_grad_and_ref_detached():
    logp, _, ref_logp, _, w = _inputs()
    k3 = kl_k3(logp, ref_logp)
    val, d = _loop(_k3_ref, logp, ref_logp)
    _close(k3, val)
    assert (k3 >= 0).all()
    (w * k3).sum().backward()
    _close(logp.grad, (w * torch.tensor(d)).tolist())
    assert ref_logp.grad is None


def test_kl_k3_huge_gap_is_finite():
    k3 = kl_k3(torch.tensor([[-200.0, 0.0]], requires_grad=True), torch.tensor([[0.0, -200.0]]))
    assert torch.isfinite(k3).all()
    _close(k3, [[math.exp(20) - 21, math.exp(-20) + 19]], atol=1.0)


def _k3_clamped_ref(lp, ref, c):
    k, d = _k3_ref(lp, ref)
    return min(max(k, -c), c), (0.0 if abs(k) > c else d)  # the clamped branch is constant in logp


@pytest.mark.parametrize("c", [0.3, 1.0])
def test_kl_clamp_value_and_grad(c):
    logp, _, ref_logp, _, w = _inputs()
    k3 = kl_k3(logp, ref_logp, kl_clamp=c)
    val, d = _loop(lambda lp, ref: _k3_clamped_ref(lp, ref, c), logp, ref_logp)
    _close(k3, val)
    raw, _ = _loop(_k3_ref, logp, ref_logp)
    active = torch.tensor(raw) > c
    assert active.any() and (~active).any()  # the data exercises both sides of the clamp
    (w * k3).sum().backward()
    _close(logp.grad, (w * torch.tensor(d)).tolist())
    assert (logp.grad[active] == 0).all()  # clamped tokens get no KL gradient
    assert (logp.grad[~active] != 0).all()


def test_kl_clamp_none_is_unclamped_exactly():
    logp, _, ref_logp, _, _ = _inputs()
    plain = kl_k3(logp, ref_logp)
    assert torch.equal(kl_k3(logp, ref_logp, kl_clamp=None), plain)
    _close(plain, _loop(_k3_ref, logp, ref_logp)[0])
    assert torch.equal(kl_k3(logp, ref_logp, kl_clamp=1e6), plain)  # an inactive clamp changes nothing
    with pytest.raises(ValueError, match="kl_clamp"):
        kl_k3(logp, ref_logp, kl_clamp=0.0)
    with pytest.raises(ValueError, match="kl_clamp"):
        kl_k3(logp, ref_logp, kl_clamp=-10.0)


@pytest.mark.parametrize("which", ["sft", "on", "off"])
def test_kl_clamp_threads_through_every_token_loss(which):
    logp, old_logp, ref_logp, adv, w = _inputs(seed=2)
    c = 0.3

    def tl(**kw):
        if which == "sft":
            return sft_token_loss(logp, **kw)
        if which == "on":
            return on_policy_grpo_token_loss(logp, old_logp, adv, **kw)
        return off_policy_grpo_token_loss(logp, adv, **kw)

    # default (no kl_clamp keyword) and kl_clamp=None agree bit for bit
    assert torch.equal(tl(ref_logp=ref_logp, kl_coef=BETA, kl_clamp=None), tl(ref_logp=ref_logp, kl_coef=BETA))
    # with the clamp: the loss is the KL-free loss plus beta * clip(k3, -c, c), value and gradient
    clamped = tl(ref_logp=ref_logp, kl_coef=BETA, kl_clamp=c)
    base = tl()
    val, d = _loop(lambda lp, ref: _k3_clamped_ref(lp, ref, c), logp, ref_logp)
    assert 0 < sum(v == c for r in val for v in r) < B * T  # the clamp is active on some tokens only
    _close(clamped - base, (BETA * torch.tensor(val)).tolist())
    _close(_grad(clamped, logp, w) - _grad(base, logp, w), (BETA * w * torch.tensor(d)).tolist())


def test_sft_token_loss():
    logp, _, ref_logp, _, w = _inputs()
    val, d = _loop(lambda lp, ref: (-lp + BETA * _k3_ref(lp, ref)[0], -1 + BETA * _k3_ref(lp, ref)[1]), logp, ref_logp)
    loss = sft_token_loss(logp, ref_logp=ref_logp, kl_coef=BETA)
    _close(loss, val)
    _close(_grad(loss, logp, w), (w * torch.tensor(d)).tolist())
    _close(sft_token_loss(logp), (-logp).tolist())
    with pytest.raises(ValueError, match="ref_logp"):
        sft_token_loss(logp, kl_coef=BETA)


# --- on-policy -------------------------------------------------------------------------------------


def _on_ref(lp, old, ref, a, clip_eps, beta):
    r = math.exp(lp - old)
    if clip_eps is None:
        v, d = -r * a, -r * a
    else:
        c = min(max(r, 1 - clip_eps), 1 + clip_eps)
        v = -min(r * a, c * a)
        d = -r * a if r * a <= c * a else 0.0  # the clipped branch is constant in logp
    kv, kd = _k3_ref(lp, ref)
    return v + beta * kv, d + beta * kd


@pytest.mark.parametrize("clip_eps", [EPS, None])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_on_policy_value_and_grad(clip_eps, beta):
    logp, old_logp, ref_logp, adv, w = _inputs()
    a = adv[:, None].expand(B, T)
    val, d = _loop(lambda lp, old, ref, aa: _on_ref(lp, old, ref, aa, clip_eps, beta), logp, old_logp, ref_logp, a)
    loss = on_policy_grpo_token_loss(logp, old_logp, adv, clip_eps=clip_eps, ref_logp=ref_logp, kl_coef=beta)
    _close(loss, val)
    (w * loss).sum().backward()
    _close(logp.grad, (w * torch.tensor(d)).tolist())
    assert old_logp.grad is None and ref_logp.grad is None


def test_on_policy_ratio_one_when_old_equals_logp():
    logp, _, _, adv, w = _inputs()
    loss = on_policy_grpo_token_loss(logp, logp.detach().clone(), adv)
    _close(loss, (-adv[:, None].expand(B, T)).tolist())
    _close(_grad(loss, logp, w), (-w * adv[:, None]).tolist())


# --- off-policy ------------------------------------------------------------------------------------


def _off_ref(lp, ref, a, clip_eps, beta, gamma):
    p = math.exp(lp)
    if gamma is not None:
        v, d = -p / (p + gamma) * a, -a * gamma * p / (p + gamma) ** 2
    elif clip_eps is None:
        v, d = -p * a, -p * a
    else:
        c = max(p, 1 - clip_eps)
        v = -min(p * a, c * a)
        d = 0.0 if (a < 0 and p < 1 - clip_eps) else -p * a
    kv, kd = _k3_ref(lp, ref)
    return v + beta * kv, d + beta * kd


@pytest.mark.parametrize("clip_eps,gamma", [(EPS, None), (None, None), (EPS, 0.1)])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_off_policy_value_and_grad(clip_eps, gamma, beta):
    logp, _, ref_logp, adv, w = _inputs(seed=3)
    a = adv[:, None].expand(B, T)
    val, d = _loop(lambda lp, ref, aa: _off_ref(lp, ref, aa, clip_eps, beta, gamma), logp, ref_logp, a)
    loss = off_policy_grpo_token_loss(logp, adv, clip_eps=clip_eps, ref_logp=ref_logp, kl_coef=beta, luffy_gamma=gamma)
    _close(loss, val)
    (w * loss).sum().backward()
    _close(logp.grad, (w * torch.tensor(d)).tolist())
    assert ref_logp.grad is None


def test_off_policy_clip_gradient_structure():
    logp, _, _, _, _ = _inputs(seed=4)
    p = logp.detach().exp()
    adv = torch.tensor([1.0, -1.0, 0.7, -0.7, 2.0, -2.0])
    grad = torch.autograd.grad(off_policy_grpo_token_loss(logp, adv, clip_eps=EPS).sum(), logp)[0]
    neg_low = (adv[:, None] < 0) & (p < 1 - EPS)
    assert neg_low.any() and ((adv[:, None] < 0) & ~neg_low).any()
    assert (grad[neg_low] == 0).all()  # wrong responses: unconfident tokens are left alone
    pos = (adv[:, None] > 0).expand(B, T)
    torch.testing.assert_close(grad[pos], (-adv[:, None] * p)[pos])  # right responses: -A*p, slow for low p
    torch.testing.assert_close(grad[~pos & ~neg_low], (-adv[:, None] * p)[~pos & ~neg_low])
    # the A<0, p<1-eps term is the constant -(1-eps)*A
    loss = off_policy_grpo_token_loss(logp, adv, clip_eps=EPS).detach()
    torch.testing.assert_close(loss[neg_low], (-(1 - EPS) * adv[:, None].expand(B, T))[neg_low])


# --- aggregation -----------------------------------------------------------------------------------


def test_seq_mean_token_mean_value_and_grad():
    g = torch.Generator().manual_seed(5)
    tl = torch.randn(B, T, generator=g, requires_grad=True)
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[2] = 0  # an empty row contributes 0
    num_seqs = 11
    ref, dref = 0.0, [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(mask[b].tolist())
        for t in range(T):
            if mask[b, t] > 0:
                ref += tl[b, t].item() / n / num_seqs
                dref[b][t] = 1.0 / n / num_seqs
    loss = seq_mean_token_mean(tl, mask, num_seqs)
    _close(loss, ref)
    loss.backward()
    _close(tl.grad, dref)
    assert (tl.grad[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="num_seqs"):
        seq_mean_token_mean(tl, mask, 0)


def _agg_data(seed):
    g = torch.Generator().manual_seed(seed)
    tl = torch.randn(B, T, generator=g, requires_grad=True)
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[2] = 0  # an empty row contributes 0
    mask[4] = 1  # a full row
    return tl, mask


def _agg_ref(mode, tl, mask, num_seqs=None, num_tokens=None, norm_len=None):
    """Loop reference: (value, d value / d l_bt as a nested list) for one aggregation mode."""
    ref, dref = 0.0, [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(mask[b].tolist())
        for t in range(T):
            if mask[b, t] > 0:
                if mode == "seq-mean-token-mean":
                    wt = 1.0 / n / num_seqs
                elif mode == "token-mean":
                    wt = 1.0 / num_tokens
                else:
                    wt = 1.0 / norm_len / num_seqs
                ref += tl[b, t].item() * wt
                dref[b][t] = wt
    return ref, dref


def test_token_mean_value_and_grad():
    tl, mask = _agg_data(7)
    num_tokens = 37  # the step's token count (other micro-batches and ranks hold the rest)
    ref, dref = _agg_ref("token-mean", tl, mask, num_tokens=num_tokens)
    loss = token_mean(tl, mask, num_tokens)
    _close(loss, ref)
    loss.backward()
    _close(tl.grad, dref)
    assert (tl.grad[mask == 0] == 0).all()
    torch.testing.assert_close(token_mean(tl, mask, torch.tensor(num_tokens)), loss)  # an all-reduced count
    # with the local count it is the masked token mean
    _close(token_mean(tl, mask, int(mask.sum())), masked_mean(tl.detach(), mask).item())


@pytest.mark.parametrize("norm_len", [T, 16])
def test_seq_mean_token_sum_norm_value_and_grad(norm_len):
    tl, mask = _agg_data(8)
    num_seqs = 11
    ref, dref = _agg_ref("seq-mean-token-sum-norm", tl, mask, num_seqs=num_seqs, norm_len=norm_len)
    loss = seq_mean_token_sum_norm(tl, mask, num_seqs, norm_len)
    _close(loss, ref)
    loss.backward()
    _close(tl.grad, dref)
    assert (tl.grad[mask == 0] == 0).all()
    # the token weight 1/(L*N_seq) is the same for every unmasked token, whatever its response's length
    assert torch.unique(tl.grad[mask == 1]).numel() == 1


def test_aggregation_errors_on_non_positive_counts():
    tl, mask = _agg_data(9)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_tokens"):
            token_mean(tl, mask, bad)
        with pytest.raises(ValueError, match="num_seqs"):
            seq_mean_token_sum_norm(tl, mask, bad, T)
        with pytest.raises(ValueError, match="norm_len"):
            seq_mean_token_sum_norm(tl, mask, B, bad)
    with pytest.raises(ValueError, match="num_tokens"):
        token_mean(tl, mask, torch.tensor(0))


def test_masked_tokens_get_no_gradient_through_every_loss():
    logp, old_logp, ref_logp, adv, _ = _inputs()
    mask = torch.ones(B, T)
    mask[:, -2:] = 0
    mask[1] = 0
    for tl in (
        sft_token_loss(logp, ref_logp=ref_logp, kl_coef=BETA),
        on_policy_grpo_token_loss(logp, old_logp, adv, ref_logp=ref_logp, kl_coef=BETA),
        off_policy_grpo_token_loss(logp, adv, ref_logp=ref_logp, kl_coef=BETA),
        off_policy_grpo_token_loss(logp, adv, luffy_gamma=0.1),
    ):
        grad = torch.autograd.grad(seq_mean_token_mean(tl, mask, B), logp)[0]
        assert (grad[mask == 0] == 0).all()
        assert (grad[mask == 1] != 0).any()


AGG_MODES = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("bounds", [[0, 2, 4, 6], [0, 1, 4, 6], [0, 3, 6], [0, 1, 2, 3, 4, 5, 6]])
def test_micro_batches_with_global_counts_match_full_batch(mode, bounds):
    """Micro-batches (or ranks) summing aggregates taken with the GLOBAL count give the full-batch loss."""
    logp, _, ref_logp, _, _ = _inputs(seed=6)
    rewards = torch.tensor([1.0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, 3, all_positive_bias=0.5)  # advantages from whole groups
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    mask[5] = 0
    num_seqs, num_tokens, norm_len = B, int(mask.sum()), 8  # counts of the whole step, all-reduced once

    def loss_of(sl):
        tl = off_policy_grpo_token_loss(logp[sl], adv[sl], ref_logp=ref_logp[sl], kl_coef=BETA)  # [b, T]
        if mode == "seq-mean-token-mean":
            return seq_mean_token_mean(tl, mask[sl], num_seqs)
        if mode == "token-mean":
            return token_mean(tl, mask[sl], num_tokens)
        return seq_mean_token_sum_norm(tl, mask[sl], num_seqs, norm_len)

    full = loss_of(slice(0, B))
    g_full = torch.autograd.grad(full, logp)[0]
    tl_full = off_policy_grpo_token_loss(logp, adv, ref_logp=ref_logp, kl_coef=BETA).detach()  # [B, T]
    _close(full, _agg_ref(mode, tl_full, mask, num_seqs, num_tokens, norm_len)[0])
    parts = [loss_of(slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]  # splits across groups on purpose
    g_parts = torch.autograd.grad(sum(parts), logp)[0]
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(g_parts, g_full)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 1]])
    _close(masked_mean(x, m), (1 + 3 + 6) / 3)
    _close(masked_mean(x, torch.zeros(2, 3)), 0.0)
