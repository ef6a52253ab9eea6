"""Cached reference log-probs: off-policy data is fixed, so log pi_ref of every teacher token is computed once,
before the first update (the policy IS the reference then), and no reference model is held during training.

prepare() runs the pre-pass in the training step's micro-batches (train.micro_batch_tokens packed, or
train.micro_batch_size sequences: the step's memory, not a whole padded group), or reuses a complete cache made
from the same inputs (fingerprint.json); RefCache reads it lazily and checks every row against its length. Called by train.py; `cfg` is train.Config.
"""
import hashlib
import json
import math
import os
import shutil

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import dist_utils
import packing
from dist_utils import print0


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def ref_fingerprint(cfg, d, tokenizer, dataset) -> dict:
    """What the cached log-probs depend on: the data file's contents, the questions kept (cache keys are their
    indices), how they are tokenised and cut, the reference model's identity (config.json contents + weight
    files' names, sizes and mtimes: hashing 15 GB of weights at every start would cost minutes) and the world
    size (the cache is sharded by rank)."""
    tok = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template], sort_keys=True)
    if cfg.model.path is not None:
        files = sorted(f for f in os.listdir(cfg.model.path) if f.endswith((".safetensors", ".json")))
        stats = [(f, os.stat(os.path.join(cfg.model.path, f)).st_size,
                  os.stat(os.path.join(cfg.model.path, f)).st_mtime_ns) for f in files]
        model_id = {"path": os.path.abspath(cfg.model.path), "files": stats,
                    "config_sha256": _sha256_file(os.path.join(cfg.model.path, "config.json"))}
    else:
        model_id = {"init_config": cfg.model.init_config, "seed": cfg.train.seed}
    ids = json.dumps([rec["id"] for rec in dataset.records])  # the questions trained on (subset, drops), in order
    fingerprint = {"data_sha256": _sha256_file(cfg.data.train_path), "max_len": cfg.data.max_len,
                   "questions_sha256": hashlib.sha256(ids.encode()).hexdigest(),
                   "group_size": cfg.data.group_size, "overlong": cfg.data.overlong,
                   "tokenizer_sha256": hashlib.sha256(tok.encode()).hexdigest(), "model": model_id,
                   "world_size": d.world_size}
    if cfg.loss.name == "sft":  # SFT's cache holds only the positive responses (its loss reads no other)
        fingerprint["responses"] = "reward > 0"
    return json.loads(json.dumps(fingerprint))  # as fingerprint.json reads back (tuples -> lists)


def _cache_action(cache_dir: str, fingerprint: dict, step: int) -> str:
    """"reuse" a complete cache made from these inputs; "compute" it (before the first update only); or an
    error line: an incomplete cache, or one made from other inputs, cannot be recomputed once the policy moved."""
    done = os.path.exists(os.path.join(cache_dir, "COMPLETE"))
    saved = None
    if done and os.path.exists(os.path.join(cache_dir, "fingerprint.json")):
        with open(os.path.join(cache_dir, "fingerprint.json")) as f:
            saved = json.load(f)
    if done and saved == fingerprint:
        return "reuse"
    if step == 0:
        if done:
            print0(f"ref logprobs: {cache_dir} was made from other inputs; recomputing")
        return "compute"
    changed = "incomplete" if not done else "made from other inputs (" + ", ".join(
        k for k in fingerprint if (saved or {}).get(k) != fingerprint[k]) + " changed)"
    return (f"error: resuming at step {step}, but the cached reference log-probs in {cache_dir} are {changed}; "
            "the policy has moved, so they cannot be recomputed: start a fresh output_dir")


def prepare(cfg, d, logprob_fn, dataset, tokenizer, step: int) -> "RefCache":
    """log pi_ref of every kept teacher token, in the training step's micro-batches (_micro_batches: the
    step's memory, not a whole padded group); rank r takes questions r::world and writes rank<r>.safetensors
    (one tensor per response, exactly its length - 1), then fingerprint.json and COMPLETE (the commit).
    logprob_fn(batch) -> logp [b, t]: the policy's log-probs (train.logprobs), the reference before step 1."""
    cache_dir = os.path.join(cfg.output_dir, "ref_logprobs")
    decision = [ref_fingerprint(cfg, d, tokenizer, dataset), None] if d.rank == 0 else [None, None]
    if d.rank == 0:
        decision[1] = _cache_action(cache_dir, decision[0], step)
        if decision[1] == "compute":
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir)
    dist.broadcast_object_list(decision, src=0)  # one decision, made once (rank 0 hashed the data)
    fingerprint, action = decision
    if action not in ("reuse", "compute"):
        raise SystemExit(action)  # every rank, so none waits for the others
    if action == "compute":
        rows = [(qi, j) for qi in range(d.rank, len(dataset), d.world_size) for j in _responses(cfg, dataset, qi)]
        tensors, last = {}, {}
        with torch.no_grad():
            for chunk in tqdm(_micro_batches(cfg, d, dataset, rows), desc="ref logprobs", disable=d.rank != 0):
                batch, lengths = _rows_batch(dataset, chunk, tokenizer.pad_token_id, last,
                                             packed=bool(cfg.train.micro_batch_tokens))
                lp = logprob_fn(batch).float().cpu()                                  # [b, t]
                for k, ((qi, j), n) in enumerate(zip(chunk, lengths)):
                    if qi % d.world_size == d.rank:
                        tensors[f"q{qi}.{j}"] = lp[k, :n - 1].contiguous()             # [n - 1]
        save_file(tensors, os.path.join(cache_dir, f"rank{d.rank}.safetensors"))
        dist.barrier()
        if d.rank == 0:
            with open(os.path.join(cache_dir, "fingerprint.json"), "w") as f:
                json.dump(fingerprint, f)
            open(os.path.join(cache_dir, "COMPLETE"), "w").close()
    dist.barrier()
    return RefCache(cache_dir, d.world_size)


def _responses(cfg, dataset, qi: int):
    """The responses of question qi that the loss reads: SFT only the positive ones (reward > 0), else all G."""
    if cfg.loss.name != "sft":
        return range(cfg.data.group_size)
    return [j for j, r in enumerate(dataset[qi]["rewards"]) if r > 0]


def _micro_batches(cfg, d, dataset, rows: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """This rank's rows (question, response) in micro-batches, as many on every rank (FSDP): packed bins of
    train.micro_batch_tokens (packing.plan_across_ranks), or train.micro_batch_size rows. A rank left with
    fewer rows repeats one (its results are discarded or equal)."""
    if cfg.train.micro_batch_tokens:
        lengths = [dataset.lengths(qi)[j] for qi, j in rows]
        bins = packing.plan_across_ranks(lengths, cfg.train.micro_batch_tokens, d.device)
        chunks = [sorted(rows[i] for i in b) for b in bins]  # (question order: the memo below hits)
    else:
        mbs = cfg.train.micro_batch_size
        n_batches = dist_utils.max_over_ranks(math.ceil(len(rows) / mbs), d.device)  # (SFT: ranks differ)
        chunks = [rows[b * mbs:(b + 1) * mbs] for b in range(n_batches)]
    return [c or rows[-1:] or [(0, 0)] for c in chunks]


def _rows_batch(dataset, rows, pad_id, memo: dict, packed: bool = False):
    """Padded batch of single responses (qi, j) -> (batch, lengths), with its packed row when `packed`; memo
    keeps the last question's item."""
    items = []
    for qi, j in rows:
        if memo.get("qi") != qi:
            memo.update(qi=qi, item=dataset[qi])
        it = memo["item"]
        items.append({"input_ids": [it["input_ids"][j]], "loss_mask": [it["loss_mask"][j]],
                      "rewards": [it["rewards"][j]]})
    batch = data.collate(items, pad_id)
    if packed:
        batch["packed"] = packing.pack([torch.tensor(it["input_ids"][0]) for it in items])
    return batch, [len(it["input_ids"][0]) for it in items]


class RefCache:
    """Reads the pre-pass's per-rank files lazily; ref_logp of training rows, checked against their lengths."""

    def __init__(self, cache_dir: str, world_size: int):
        self.world_size = world_size
        self.handles = [safe_open(os.path.join(cache_dir, f"rank{r}.safetensors"), "pt") for r in range(world_size)]

    def logprobs(self, rows: list[tuple[int, int, int]], width: int, device):
        """ref_logp [b, width - 1] for rows (question qi, response j, its n tokens), 0 after each length; n None:
        a placeholder row (train_step's weight-0 forward), all 0."""
        out = torch.zeros(len(rows), width - 1)                                        # [b, t]
        for k, (qi, j, n) in enumerate(rows):
            if n is None:
                continue
            cached = self.handles[qi % self.world_size].get_tensor(f"q{qi}.{j}")        # [n - 1]
            if cached.shape[0] != n - 1:
                raise SystemExit(f"error: cached reference log-probs of question {qi}, response {j} cover "
                                 f"{cached.shape[0]} tokens, the data has {n - 1}: the cache is stale")
            out[k, :n - 1] = cached
        return out.to(device)


