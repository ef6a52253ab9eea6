"""GRPO losses: on-policy, off-policy on teacher trajectories, the all-positive bias, SFT, and DPO on teacher pairs.

A question has G responses o_1..o_G with rewards r_i; per token, logp = log pi_theta(o_it | q, o_i<t)
and p = exp(logp). Every loss below is per token ([B, T], minimised); the three aggregation functions of
item 5 are the only places that reduce and normalise.

1. Advantages:  A_i = (r_i - mean_g r) / (std_g r + eps)   (std unbiased; scale_by_std=False: r_i - mean_g r)
2. Bias:        if every r_i of the group is > 0, A_i <- A_i + b   (0/1 rewards: such a group gets exactly b)
3. KL (k3):     k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1, gradient through logp only;
                kl_clamp=c -> clip(k3, -c, c)   (verl's low_var_kl, c = 10 in the released code)
4. Losses:      sft         -logp + beta*k3
                on-policy   -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A) + beta*k3,  ratio = exp(logp - old_logp)
                off-policy  -min(p*A, max(p, 1-eps)*A) + beta*k3   (teacher prob taken as 1: ratio = p <= 1)
                LUFFY       -p/(p+gamma)*A + beta*k3                (optional off-policy shaping)
5. Aggregation (verl's names), with counts of the whole optimizer step (all micro-batches and ranks,
   all-reduced once by the caller), so summing over micro-batches and ranks gives the full-batch loss:
                seq-mean-token-mean      sum_i ( sum_t m_it*l_it / sum_t m_it ) / N_seq   (the seed; N_seq sequences)
                token-mean               sum_i sum_t m_it*l_it / N_tok          (DAPO; N_tok response tokens)
                seq-mean-token-sum-norm  sum_i ( sum_t m_it*l_it / L ) / N_seq  (Dr.GRPO; L the token budget)
6. DPO on teacher pairs (per pair, not per token): the pairs (w, l) are every (positive, negative) response pair
   inside a group; S_i = sum_t m_it*logp_it (dpo_norm=mean: S_i / sum_t m_it), S_ref likewise;
                l_p = -log sigmoid(beta * ((S_w - S_w_ref) - (S_l - S_l_ref)))
   and the step's loss is sum_p l_p / N_pairs over all pairs of the step on all ranks (dpo.py).

What the off-policy clip does: for A > 0 the gradient is A*p*grad(logp), so low-probability teacher
tokens learn slowly. For A < 0 the term is the constant (1-eps)*A whenever p < 1-eps, so only the
confident tokens of wrong responses are pushed down.

Tensors are float32: logp, old_logp, ref_logp [B, T]; rewards, adv [B]; mask [B, T] of 0/1.
"""

import torch

# exp() of a log-ratio beyond this bound is clamped: e^20 ~ 5e8 is already far outside any trust region,
# and e^89 overflows float32. Beyond the bound the clamped term has zero gradient.
MAX_LOG_RATIO = 20.0


def group_advantages(rewards, group_size, *, scale_by_std=True, all_positive_bias=0.0, eps=1e-6):
    """A_i = (r_i - mean_g r) / (std_g r + eps) [+ b if all r_g > 0]; rewards [B] in contiguous groups -> [B].

    std is unbiased (Bessel). scale_by_std=False gives A_i = r_i - mean_g r (Dr.GRPO, KRAFTON's code).
    A group whose rewards are all > 0 gets + all_positive_bias on every A_i.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a whole number of groups of {group_size}")
    if scale_by_std and group_size < 2:
        raise ValueError(f"scale_by_std needs group_size >= 2 for an unbiased std, got {group_size}")
    r = rewards.view(-1, group_size)  # [B/G, G]
    adv = r - r.mean(dim=1, keepdim=True)  # [B/G, G]
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # [B/G, G]
    all_positive = (r > 0).all(dim=1, keepdim=True)  # [B/G, 1]
    adv = adv + all_positive_bias * all_positive.to(adv.dtype)  # [B/G, G]
    return adv.view(-1)  # [B]


def kl_k3(logp, ref_logp, *, kl_clamp=None):
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 >= 0; d k3 / d logp = 1 - exp(ref_logp - logp).

    ref_logp is detached. The log-ratio is clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] = [-20, 20] before
    exp so a huge gap cannot overflow; a token beyond the bound has zero gradient.
    kl_clamp=c -> k3 <- min(max(k3, -c), c) (verl's low_var_kl; the released code uses c = 10; k3 >= 0, so
    in effect min(k3, c)). Where the clamp is active (k3 > c) the token's KL gradient is zero: the penalty
    stops pulling exactly the tokens that drifted furthest from the reference. None (default) is off.
    """
    if kl_clamp is not None and not kl_clamp > 0:
        raise ValueError(f"kl_clamp must be > 0 or None, got {kl_clamp}")
    log_ratio = (ref_logp.detach() - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    k3 = torch.exp(log_ratio) - log_ratio - 1  # [B, T]
    if kl_clamp is not None:
        k3 = k3.clamp(-kl_clamp, kl_clamp)  # [B, T]
    return k3  # [B, T]


def _kl_term(logp, ref_logp, kl_coef, kl_clamp):
    """beta * k3, or 0 when kl_coef == 0. A nonzero kl_coef without ref_logp is an error, not a no-op."""
    if kl_coef == 0.0:
        return 0.0
    if ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
    return kl_coef * kl_k3(logp, ref_logp, kl_clamp=kl_clamp)  # [B, T]


def sft_token_loss(logp, *, ref_logp=None, kl_coef=0.0, kl_clamp=None):
    """l = -logp + beta*k3  -> [B, T]   (k3 clamped to [-kl_clamp, kl_clamp] when kl_clamp is set).

    SFT trains on positive responses only (r > 0): the caller selects them through the mask (zero rows
    for the others) and counts only them in num_seqs (num_tokens) of the aggregation.
    """
    return -logp + _kl_term(logp, ref_logp, kl_coef, kl_clamp)  # [B, T]


def on_policy_grpo_token_loss(logp, old_logp, adv, *, clip_eps=0.2, ref_logp=None, kl_coef=0.0, kl_clamp=None):
    """l = -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A) + beta*k3,  ratio = exp(logp - old_logp)  -> [B, T].

    old_logp is detached (it comes from the sampling policy). The log-ratio is clamped to [-20, 20]
    before exp (zero gradient beyond). clip_eps=None -> l = -ratio*A + beta*k3. kl_clamp: see kl_k3.
    """
    a = adv.unsqueeze(-1)  # [B, 1]
    ratio = torch.exp((logp - old_logp.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    if clip_eps is None:
        pg = -ratio * a  # [B, T]
    else:
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)  # [B, T]
        pg = -torch.minimum(ratio * a, clipped * a)  # [B, T]
    return pg + _kl_term(logp, ref_logp, kl_coef, kl_clamp)  # [B, T]


def off_policy_grpo_token_loss(logp, adv, *, clip_eps=0.2, ref_logp=None, kl_coef=0.0, kl_clamp=None, luffy_gamma=None):
    """l = -min(p*A, max(p, 1-eps)*A) + beta*k3,  p = exp(logp)  -> [B, T].

    The teacher's probability of its own tokens is taken as 1, so the importance ratio is p <= 1 and
    clip(p, 1-eps, 1+eps) = max(p, 1-eps). clip_eps=None -> l = -p*A + beta*k3.
    luffy_gamma=g -> l = -f(p)*A + beta*k3 with f(p) = p / (p + g) (LUFFY's policy shaping, which
    up-weights low-probability tokens); clip_eps is ignored then, as LUFFY uses no clip. kl_clamp: see kl_k3.
    """
    a = adv.unsqueeze(-1)  # [B, 1]
    p = torch.exp(logp)  # [B, T]; logp <= 0, so no overflow
    if luffy_gamma is not None:
        pg = -(p / (p + luffy_gamma)) * a  # [B, T]
    elif clip_eps is None:
        pg = -p * a  # [B, T]
    else:
        clipped = p.clamp(min=1 - clip_eps)  # [B, T]; = clip(p, 1-eps, 1+eps) because p <= 1
        pg = -torch.minimum(p * a, clipped * a)  # [B, T]
    return pg + _kl_term(logp, ref_logp, kl_coef, kl_clamp)  # [B, T]


def seq_mean_token_mean(token_loss, mask, num_seqs):
    """loss = sum_i ( sum_t m_it*l_it / max(sum_t m_it, 1) ) / num_seqs  -> scalar.

    num_seqs is the number of sequences in the whole optimizer step, across micro-batches and ranks,
    so summing this over micro-batches (and ranks) gives the full-batch loss and gradient exactly.
    Rows with an all-zero mask contribute 0. This and the two functions below are the only places that
    reduce and normalise.
    """
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}; skip steps with no sequences")
    mask = mask.to(token_loss.dtype)  # [B, T]
    per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.sum() / num_seqs  # []


def token_mean(token_loss, mask, num_tokens):
    """loss = sum_i sum_t m_it*l_it / num_tokens  -> scalar   (DAPO's token-level loss).

    num_tokens = N_tok, the number of response tokens (mask ones) in the whole optimizer step, across
    micro-batches and ranks, all-reduced once by the caller like num_seqs; summing this over
    micro-batches (and ranks) gives the full-batch loss and gradient exactly. Every token weighs the
    same, so long responses weigh more than in seq_mean_token_mean.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}; skip steps with no response tokens")
    mask = mask.to(token_loss.dtype)  # [B, T]
    return (token_loss * mask).sum() / num_tokens  # []


def seq_mean_token_sum_norm(token_loss, mask, num_seqs, norm_len):
    """loss = sum_i ( sum_t m_it*l_it / L ) / num_seqs,  L = norm_len  -> scalar   (Dr.GRPO).

    L is a constant, the response-token budget (max response length), not the length of response i, so
    a token's weight does not depend on its response's length. num_seqs as in seq_mean_token_mean
    (sequences of the whole optimizer step); summing over micro-batches and ranks is exact.
    """
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}; skip steps with no sequences")
    if norm_len < 1:
        raise ValueError(f"norm_len must be >= 1 (the response-token budget), got {norm_len}")
    mask = mask.to(token_loss.dtype)  # [B, T]
    per_seq = (token_loss * mask).sum(-1) / norm_len  # [B]
    return per_seq.sum() / num_seqs  # []


def masked_mean(x, mask):
    """sum(m*x) / max(sum(m), 1) over all elements -> scalar; for token-level metrics."""
    mask = mask.to(x.dtype)  # [B, T]
    return (x * mask).sum() / mask.sum().clamp(min=1)  # []


def sequence_logp(logp, mask):
    """S_i = sum_t m_it*logp_it -> [B]: a response's log-probability (the per-sequence sum DPO compares)."""
    return (logp * mask.to(logp.dtype)).sum(-1)  # [B]


def dpo_pairs(rewards, group_size):
    """Every (positive, negative) pair inside each group: (chosen [P], rejected [P]) long indices into rewards [B].

    Positive: r > 0 (as SFT's rule), negative: r <= 0. Group g (rows g*G .. g*G + G - 1) gives n_pos * n_neg pairs,
    ordered by group, then chosen, then rejected; an all-positive or all-negative group gives none.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards {tuple(rewards.shape)} is not a 1-D batch of whole groups of {group_size}")
    pos = rewards.view(-1, group_size) > 0  # [B/G, G]
    pair = pos[:, :, None] & ~pos[:, None, :]  # [B/G, G, G]: (group, chosen j, rejected k)
    g, j, k = pair.nonzero(as_tuple=True)  # [P] each
    return g * group_size + j, g * group_size + k  # [P], [P]


def dpo_pair_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta):
    """l_p = -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))  -> [P]   (Rafailov et al. 2023, eq. 7).

    The arguments are per-sequence [P] log-probabilities of each pair's chosen and rejected response under the
    policy and the reference: sums over response tokens (loss.dpo_norm=sum) or per-token means (mean). The
    gradient is -beta * sigmoid(-z) * (grad c - grad r), z the margin inside: a pair the policy already orders
    by a wide margin stops pulling. log sigmoid is computed stably (softplus), so no margin overflows.
    """
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)  # [P]
    return -torch.nn.functional.logsigmoid(beta * margin)  # [P]
