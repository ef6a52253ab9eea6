"""DPO on teacher pairs (loss.name=dpo): one optimizer step's backward, exact however a group is batched.

Pairs (loss.dpo_pairs): every (positive, negative) response pair of a group's teacher samples, on the same
majority-vote rewards the GRPO rows use; an all-positive or all-negative group gives none (data/pairless_share).
With S_i = sum_t m_it * logp_it (loss.sequence_logp), n_i = sum_t m_it and x_i = S_i (dpo_norm=sum) or S_i / n_i
(dpo_norm=mean), the step's loss over its N_pairs pairs on all ranks (N_pairs all-reduced once) is

    L = 1/N_pairs * sum_p [ -log sigmoid(beta * ((x_w - x_w_ref) - (x_l - x_l_ref)))  +  c * (-S_w / n_w) ]

(c = loss.dpo_nll_coef: the token-mean NLL of the chosen response, as iterative RPO adds). A pair's two
responses sit in different micro-batches (at 7B one group of 8 x 32k tokens never fits one forward), so their
sums are never in one autograd graph. But L depends on theta only through the S_i, so

    dL/dtheta = sum_i w_i * dS_i/dtheta,   w_i = dL/dS_i   (a function of the detached S alone)

and the step runs in two passes over the same micro-batches:
  1. no grad: S_i of every row that is in some pair (and S_i_ref: the cached pre-pass or the live reference);
  2. w = dL/dS by autograd on the detached [B] vector (the same dpo_pair_loss the loss value comes from), then
     per micro-batch backward of sum_i w_i * S_i(theta): exactly the full-batch gradient.
Work against offgrpo: one extra no-grad forward of the paired rows per step (no activations kept); the rows of
pairless groups are skipped in both passes. Every rank runs the same number of micro-batches (FSDP: each forward
is a collective); a rank with fewer pads with a repeat of one of its rows at weight 0.

Called from train.train_step; `cfg` is train.Config, logprob_fn(model, batch) -> logp [b, t] is train.logprobs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import data
import loss as L
import packing
from yaml_config import need


def validate(cfg) -> None:
    """loss.dpo_* checks (any loss.name) and what loss.name=dpo refuses."""
    lc = cfg.loss
    need(lc.dpo_beta > 0, f"loss.dpo_beta must be > 0, got {lc.dpo_beta}")
    need(lc.dpo_norm in ("sum", "mean"), f"loss.dpo_norm must be sum or mean, got {lc.dpo_norm!r}")
    need(lc.dpo_nll_coef >= 0, f"loss.dpo_nll_coef must be >= 0, got {lc.dpo_nll_coef}")
    if lc.name == "dpo":
        need(lc.kl_coef == 0, "loss.name=dpo: loss.dpo_beta is its KL strength; set loss.kl_coef=0 (the k3 term is GRPO's)")
        need(lc.entropy_coef == 0, "loss.name=dpo has no entropy bonus; set loss.entropy_coef=0")


def objective(cfg, S, S_ref, n, chosen, rejected, num_pairs: float):
    """L of this rank's pairs (the module docstring) from per-sequence sums S, S_ref and token counts n [B]
    (float64) -> (L as a scalar, divided by the step's num_pairs; beta * margin per pair [P])."""
    lc = cfg.loss
    x, x_ref = (S / n, S_ref / n) if lc.dpo_norm == "mean" else (S, S_ref)               # [B], [B]
    pair = L.dpo_pair_loss(x[chosen], x[rejected], x_ref[chosen], x_ref[rejected], beta=lc.dpo_beta)  # [P]
    nll = -S[chosen] / n[chosen]                                                       # [P]
    margin = lc.dpo_beta * ((x[chosen] - x_ref[chosen]) - (x[rejected] - x_ref[rejected]))  # [P]
    return (pair + lc.dpo_nll_coef * nll).sum() / num_pairs, margin.detach()


def plan(cfg, d, used: list[int], n_tok: list[int]) -> list[list[int]]:
    """The paired rows in micro-batches, as many on every rank (empty ones at the end): packed bins of
    train.micro_batch_tokens (packing.plan_across_ranks) or micro_batch_size rows in length order."""
    lengths = [n_tok[r] for r in used]
    if cfg.train.micro_batch_tokens:
        bins = packing.plan_across_ranks(lengths, cfg.train.micro_batch_tokens, d.device)
        return [[used[i] for i in b] for b in bins]
    mbs = cfg.train.micro_batch_size
    chunks = [[used[i] for i in b] for b in packing.micro_batches(lengths, micro_batch_size=mbs,
                                                                    micro_batch_tokens=0, device=d.device)]
    count = torch.tensor([float(len(chunks))], device=d.device)                         # [1]
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return chunks + [[] for _ in range(int(count.item()) - len(chunks))]


def pass_sums(cfg, d, model, ref_model, ref_cache, full, plan_, n_tok, row_key, logprob_fn):
    """Pass 1, no grad: S and S_ref [B] (float64, 0 for rows in no pair) of the rows the plan holds."""
    B = full["input_ids"].shape[0]
    S = torch.zeros(B, dtype=torch.float64, device=d.device)                            # [B]
    S_ref = torch.zeros(B, dtype=torch.float64, device=d.device)                        # [B]
    with torch.no_grad():
        for rows in plan_:
            real = bool(rows)
            rows = rows or [0]  # a padding micro-batch: run for the collectives, results dropped
            batch = packing.make_batch(full, rows, n_tok, packed=bool(cfg.train.micro_batch_tokens))
            mask = batch["loss_mask"][:, 1:].to(d.device)                               # [b, t]
            s = L.sequence_logp(logprob_fn(model, batch).double(), mask)               # [b]
            if ref_cache is not None:
                ref_logp = ref_cache.logprobs([row_key[r] for r in rows], batch["input_ids"].shape[1], d.device)
            else:
                ref_logp = logprob_fn(ref_model, batch)                                # [b, t]
            if real:
                idx = torch.tensor(rows, device=d.device)                              # [b]
                S[idx] = s
                S_ref[idx] = L.sequence_logp(ref_logp.double(), mask)                  # [b]
    return S, S_ref


def backward(cfg, d, model, ref_model, ref_cache, items: list[dict], qidx: list[int], pad_id: int,
             logprob_fn) -> dict:
    """The step's DPO gradient accumulated into model's grads (two passes, module docstring). Returns the step's
    metrics: loss (L over all ranks), tokens (response tokens of paired rows), perf/micro_batches, data/ and
    policy/ rows (pairless share, implicit-reward margin beta*(...) and pair accuracy margin > 0)."""
    G = cfg.data.group_size
    full = data.collate(items, pad_id)
    rewards = full["rewards"]                                                          # [B_rank]
    chosen, rejected = L.dpo_pairs(rewards, G)                                         # [P], [P]
    used = sorted(set(chosen.tolist()) | set(rejected.tolist()))
    n_tok = full["attention_mask"].sum(1).tolist()
    row_key = [(qi, j, n_tok[i * G + j]) for i, qi in enumerate(qidx) for j in range(G)]  # (question, response, tokens)
    pos = (rewards.view(-1, G) > 0).sum(1)                                             # [Q_rank]
    counts = torch.tensor([float(chosen.numel()), float(((pos == 0) | (pos == G)).sum()), float(len(items))],
                          dtype=torch.float64, device=d.device)                        # [3]
    dist.all_reduce(counts)  # N_pairs (and the pairless groups), once
    num_pairs, pairless, n_q = counts.tolist()
    plan_ = plan(cfg, d, used, n_tok)
    S, S_ref = pass_sums(cfg, d, model, ref_model, ref_cache, full, plan_, n_tok, row_key, logprob_fn)
    n = full["loss_mask"][:, 1:].sum(1).double().clamp(min=1).to(d.device)            # [B]
    chosen, rejected = chosen.to(d.device), rejected.to(d.device)
    S_leaf = S.clone().requires_grad_(True)                                            # [B]
    value, margin = objective(cfg, S_leaf, S_ref, n, chosen, rejected, max(num_pairs, 1.0))
    w = torch.autograd.grad(value, S_leaf)[0].float()                                   # [B]: dL/dS_i
    for rows in plan_:  # pass 2: backward of sum_i w_i * S_i(theta), the exact gradient of L
        real = bool(rows)
        rows = rows or [0]
        batch = packing.make_batch(full, rows, n_tok, packed=bool(cfg.train.micro_batch_tokens))
        mask = batch["loss_mask"][:, 1:].to(d.device)                                   # [b, t]
        w_mb = w[torch.tensor(rows, device=d.device)] * float(real)                    # [b]
        (w_mb * L.sequence_logp(logprob_fn(model, batch), mask)).sum().backward()
    if ref_model is not None:
        ref_model.reshard()
    all_pos = sum(all(r > 0 for r in it["rewards"]) for it in items)
    host = [float(rewards.sum()), float(all_pos), float(full["loss_mask"][used, 1:].sum())]  # (CPU: no sync)
    stats = torch.cat([torch.stack([value.detach(), margin.sum(), (margin > 0).double().sum()]),
                       torch.tensor(host, dtype=torch.float64, device=d.device)])      # [6]
    dist.all_reduce(stats)
    loss, margin_sum, correct, reward_sum, all_pos, tokens = stats.tolist()
    p = max(num_pairs, 1.0)
    return {"loss": loss, "tokens": tokens, "perf/micro_batches": len(plan_),  # (each runs twice)
            "policy/dpo_margin": margin_sum / p, "policy/dpo_accuracy": correct / p,
            "data/pairless_share": pairless / n_q, "data/pairs": num_pairs,
            "data/all_positive_share": all_pos / n_q, "data/reward_mean": reward_sum / (n_q * G)}
