"""Padding-free micro-batches: whole sequences packed into one row of at most `budget` tokens.

A packed row concatenates k sequences s_1..s_k (n_1 + ... + n_k tokens, no padding) with position_ids restarting
at 0 for every sequence. What transformers 5.23 does with such a row (checked in tests/test_packing.py):
  * sdpa, eager, flex_attention: with attention_mask=None and no KV cache (use_cache=False), create_causal_mask
    reads the sequence boundaries from position_ids (masking_utils.find_packed_sequence_indices: a step != +1
    starts a new sequence) and builds the block-diagonal causal mask -- exact; sdpa then materialises that mask
    as a [1, 1, L, L] bool tensor (1 GiB at L = 32k) and loses its is_causal fast path;
  * flash_attention_2 (GPU): with attention_mask=None and one row, _flash_attention_forward detects the packing
    from position_ids (_is_packed_sequence) and calls the varlen kernel with cu_seqlens -- exact, no L x L mask;
  * a 2-D attention_mask, or a KV cache, switches the detection off and attention silently crosses sequences:
    model_utils.packed_logprobs passes attention_mask=None and use_cache=False for that reason.
Rotary embeddings read the same position_ids, so every token sees exactly the positions it has unpacked.

Planning is first-fit decreasing over the sequence lengths; a sequence longer than the budget goes alone. Under
FSDP every rank must run the same number of forwards, so plan() can split bins until a common count is reached.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def plan(lengths: list[int], budget: int, num_bins: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= budget (first-fit decreasing; a longer
    sequence is a bin of its own). num_bins >= the planned count: the fullest bins holding >= 2 sequences are
    split in two until there are num_bins (each rank then runs the same number of micro-batches)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if fit is None:
            bins.append([i])
            room.append(budget - lengths[i])
        else:
            bins[fit].append(i)
            room[fit] -= lengths[i]
    if num_bins is not None:
        if not len(bins) <= num_bins <= len(lengths):
            raise ValueError(f"cannot make {num_bins} bins of {len(lengths)} sequences planned into {len(bins)}")
        while len(bins) < num_bins:
            splittable = [b for b in bins if len(b) > 1]
            fullest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
            bins.remove(fullest)
            bins += [fullest[0::2], fullest[1::2]]  # (sorted longest first: the halves hold similar lengths)
    return bins


def plan_across_ranks(lengths: list[int], budget: int, device) -> list[list[int]]:
    """plan() with the same number of bins on every rank (one all-reduce of the largest count): each forward
    under FSDP is a collective. A rank with fewer sequences than that count gets empty bins at the end, for
    its caller to fill with a repeat whose results it discards."""
    count = torch.tensor([float(len(plan(lengths, budget)))], device=device)          # [1]
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    count = int(count.item())
    bins = plan(lengths, budget, num_bins=min(count, len(lengths)))
    return bins + [[] for _ in range(count - len(bins))]


def pack(rows: list[torch.Tensor]) -> dict:
    """Sequences (1-D token id tensors) -> one packed row: input_ids [1, L] and position_ids [1, L] (0..n_i-1 for
    each sequence), and `lengths` [n_1, ..., n_k]; L = sum n_i."""
    lengths = [int(r.numel()) for r in rows]
    input_ids = torch.cat([r.long() for r in rows])[None]                              # [1, L]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]                 # [1, L]
    return {"input_ids": input_ids, "position_ids": position_ids, "lengths": lengths}


def target_positions(lengths: list[int], width: int) -> torch.Tensor:
    """Where the next-token predictions of the unpacked [k, width - 1] layout sit among the L - 1 packed ones.

    Sequence i starts at a_i = n_1 + ... + n_{i-1}; its prediction t (of token t + 1, t < n_i - 1) is packed
    position a_i + t; every other slot of the layout (row i after n_i - 1) gets index L - 1, one past the
    packed predictions, where unpack puts a zero. The prediction at a_i + n_i - 1 (the last token of s_i
    predicting the first of s_(i+1)) is never used."""
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)                                # [k]
    t = torch.arange(width - 1)                                                        # [width - 1]
    valid = t[None, :] < (torch.tensor(lengths) - 1)[:, None]                           # [k, width - 1]
    return (starts[:, None] + t[None, :]).where(valid, torch.tensor(sum(lengths) - 1))  # [k, width - 1]


def unpack(flat: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Packed predictions [L - 1] -> [k, width - 1] in the unpacked layout (row i: its n_i - 1 predictions, then
    0), differentiable (a gather)."""
    index = target_positions(lengths, width).to(flat.device)                           # [k, width - 1]
    return torch.cat([flat.reshape(-1), flat.new_zeros(1)])[index]                     # [k, width - 1]


def packed_targets(input_ids: torch.Tensor, lengths: list[int], ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets of a packed row [1, L] -> [1, L - 1]: input_ids[:, 1:], with ignore_index where a
    target would be the first token of the next sequence."""
    targets = input_ids[:, 1:].clone()                                                 # [1, L - 1]
    ends = torch.tensor(lengths).cumsum(0)[:-1] - 1                                    # last token of s_1..s_(k-1)
    targets[0, ends.to(targets.device)] = ignore_index
    return targets


def micro_batches(lengths: list[int], *, micro_batch_size: int, micro_batch_tokens: int, device) -> list[list[int]]:
    """The rows of a rank's step in micro-batches: with micro_batch_tokens (train.micro_batch_tokens), bins of
    whole sequences packed up to that many tokens (plan_across_ranks: as many on every rank, since under FSDP
    each forward is a collective); else micro_batch_size rows in length order (less padding). The loss is a
    sum over rows, so any split gives the same step."""
    if micro_batch_tokens:  # (every rank holds as many rows, so no bin stays empty)
        return plan_across_ranks(lengths, micro_batch_tokens, device)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[lo:lo + micro_batch_size] for lo in range(0, len(order), micro_batch_size)]


def make_batch(full: dict, rows: list[int], lengths: list[int], *, packed: bool) -> dict:
    """The micro-batch of `rows` of a collated step: input_ids / attention_mask / loss_mask [b, width] trimmed to
    the longest row, and when `packed` its padding-free row for the forward ("packed", pack)."""
    width = max(lengths[r] for r in rows)
    idx = torch.tensor(rows)                                                           # [b]
    batch = {k: full[k][idx, :width] for k in ("input_ids", "attention_mask", "loss_mask")}
    if packed:
        batch["packed"] = pack([full["input_ids"][r, :lengths[r]] for r in rows])
    return batch
