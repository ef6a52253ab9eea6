"""Cached reference log-probs: off-policy data is fixed, so log pi_ref of every teacher token is computed once,
before the first update (the policy IS the reference then), and no reference model is held during training.

prepare() runs the pre-pass in the training step's micro-batches (train.micro_batch_tokens packed, or
train.micro_batch_size sequences: the step's memory, not a whole padded group), or reuses a complete cache made
from the same inputs (fingerprint.json). The pre-pass is committed in shards as it goes (ref_logprobs/rank<r>/
shard-<start>-<end>.safetensors, tmp + rename), so a restart resumes it and SIGTERM stops it cleanly (exit 0);
RefCache maps each key to its shard, reads lazily and checks every row against its length. Called by train.py;
`cfg` is train.Config.
"""
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict

import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

import data
import token_cache
import dist_utils
import packing
from dist_utils import print0
from eval.inputs import model_hash


def ref_fingerprint(cfg, d, tokenizer, dataset) -> dict:
    """What the cached log-probs depend on, from what the run uses (not the whole data file, not paths or mtimes):
    the token copy's identity (token_cache.identity: the data index and the texts of the questions it holds, the
    draw, the tokenizer and chat template, max_len / overlong / group_size), the questions kept (cache keys are
    their indices, in order), the reference model's identity (eval.inputs.model_hash: config.json and the weight
    files' names, sizes and sampled blocks: a copied or moved model is the same model, a retrained one is not)
    and the world size (the cache is sharded by rank). `tokenizer` is part of the token copy's identity."""
    if cfg.model.path is not None:
        model_id = {"model_hash": model_hash(cfg.model.path)}
    else:
        model_id = {"init_config": cfg.model.init_config, "seed": cfg.train.seed}
    ids = json.dumps([rec["id"] for rec in dataset.records])  # the questions trained on (subset, drops), in order
    fingerprint = {"tokens": token_cache.identity(cfg.output_dir),
                   "questions_sha256": hashlib.sha256(ids.encode()).hexdigest(), "model": model_id,
                   "world_size": d.world_size}
    if cfg.loss.name == "sft":  # SFT's cache holds only the positive responses (its loss reads no other)
        fingerprint["responses"] = "reward > 0"
    return json.loads(json.dumps(fingerprint))  # as fingerprint.json reads back (tuples -> lists)


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _cache_action(cache_dir: str, fingerprint: dict, plan: dict, step: int) -> str:
    """"reuse" a complete cache made from these inputs; "resume" an incomplete one made from these inputs in
    the same micro-batches (its fingerprint.json is written first); "compute" it afresh (before the first
    update only); or an error line: an incomplete cache, or one made from other inputs, cannot be recomputed
    once the policy moved."""
    done = os.path.exists(os.path.join(cache_dir, "COMPLETE"))
    saved = _read_json(os.path.join(cache_dir, "fingerprint.json"))
    if done and saved == fingerprint:
        return "reuse"
    if step == 0:
        if saved == fingerprint and _read_json(os.path.join(cache_dir, "plan.json")) == plan:
            return "resume"
        if done:
            print0(f"ref logprobs: {cache_dir} was made from other inputs; recomputing")
        return "compute"
    changed = "incomplete" if not done else "made from other inputs (" + ", ".join(
        k for k in fingerprint if (saved or {}).get(k) != fingerprint[k]) + " changed)"
    return (f"error: resuming at step {step}, but the cached reference log-probs in {cache_dir} are {changed}; "
            "the policy has moved, so they cannot be recomputed: start a fresh output_dir")


def prepare(cfg, d, logprob_fn, dataset, tokenizer, step: int, stop: dict | None = None) -> "RefCache":
    """log pi_ref of every kept teacher token, in the training step's micro-batches (_micro_batches: the
    step's memory, not a whole padded group), or a complete cache of the same inputs reused. Rank r takes
    questions r::world (SFT: their positive responses only); fingerprint.json and plan.json come first, then
    every loss.ref_shard_every micro-batches a shard rank<r>/shard-<start>-<end>.safetensors (micro-batches
    [start, end), one tensor per response, exactly its length - 1) is committed by a rename, and COMPLETE
    last. An interrupted pre-pass resumes at the last micro-batch every rank committed (_resume_point).
    SIGTERM (stop["requested"], all-reduced after every micro-batch): every rank commits its partial shard,
    tears down and exits 0. logprob_fn(batch) -> logp [b, t]: the policy's (train.logprobs), the reference
    before step 1."""
    cache_dir = os.path.join(cfg.output_dir, "ref_logprobs")
    plan = {"micro_batch_size": cfg.train.micro_batch_size, "micro_batch_tokens": cfg.train.micro_batch_tokens}
    decision = [None, None]
    if d.rank == 0:
        fingerprint = ref_fingerprint(cfg, d, tokenizer, dataset)
        decision = [fingerprint, _cache_action(cache_dir, fingerprint, plan, step)]
        if decision[1] == "compute":
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir)
            _write_json(os.path.join(cache_dir, "fingerprint.json"), fingerprint)  # first: a later start resumes
            _write_json(os.path.join(cache_dir, "plan.json"), plan)
    dist.broadcast_object_list(decision, src=0)  # one decision, made once (rank 0 hashed the data)
    action = decision[1]
    if action not in ("reuse", "compute", "resume"):
        raise SystemExit(action)  # every rank, so none waits for the others
    if action != "reuse":
        _prepass(cfg, d, logprob_fn, dataset, tokenizer, cache_dir, stop or {"requested": False})
    dist.barrier()
    return RefCache(cache_dir, d.world_size)


def _prepass(cfg, d, logprob_fn, dataset, tokenizer, cache_dir: str, stop: dict) -> None:
    """This rank's micro-batches from the resume point on, committed in shards; COMPLETE when all are."""
    rows = [(qi, j) for qi in range(d.rank, len(dataset), d.world_size) for j in _responses(cfg, dataset, qi)]
    chunks = _micro_batches(cfg, d, dataset, rows)
    mine = os.path.join(cache_dir, f"rank{d.rank}")
    os.makedirs(mine, exist_ok=True)
    begin = _resume_point(d, mine)
    if begin:
        print0(f"ref logprobs: resuming the pre-pass at micro-batch {begin} of {len(chunks)}")
    tensors, last = {}, {}
    with torch.no_grad():
        for m in tqdm(range(begin, len(chunks)), desc="ref logprobs", disable=d.rank != 0):
            batch, lengths = _rows_batch(dataset, chunks[m], tokenizer.pad_token_id, last,
                                         packed=bool(cfg.train.micro_batch_tokens))
            lp = logprob_fn(batch).float().cpu()                                      # [b, t]
            for k, ((qi, j), n) in enumerate(zip(chunks[m], lengths)):
                if qi % d.world_size == d.rank:
                    tensors[f"q{qi}.{j}"] = lp[k, :n - 1].contiguous()                 # [n - 1]
            flag = torch.tensor([float(stop["requested"])], device=d.device)           # [1]
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops after the same micro-batch
            if m + 1 - begin == cfg.loss.ref_shard_every or m + 1 == len(chunks) or flag.item() > 0:
                _commit_shard(mine, begin, m + 1, tensors)
                tensors, begin = {}, m + 1
            if flag.item() > 0:
                dist.barrier()
                print0(f"SIGTERM: reference pre-pass stopped after micro-batch {m + 1} of {len(chunks)}, its "
                       f"shards committed (the next start resumes there); exiting")
                dist_utils.teardown_distributed()
                sys.exit(0)
    dist.barrier()
    if d.rank == 0:
        open(os.path.join(cache_dir, "COMPLETE"), "w").close()


def _commit_shard(mine: str, start: int, end: int, tensors: dict) -> None:
    """rank<r>/shard-<start>-<end>.safetensors, written to *.tmp and committed by one rename."""
    path = os.path.join(mine, f"shard-{start}-{end}.safetensors")
    safetensors.torch.save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def _shards(mine: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of a rank's committed shards, by start."""
    found = [(int(m.group(1)), int(m.group(2)), os.path.join(mine, n)) for n in os.listdir(mine)
             if (m := re.fullmatch(r"shard-(\d+)-(\d+)\.safetensors", n))]
    return sorted(found)


def _resume_point(d, mine: str) -> int:
    """The micro-batch every rank has committed up to: each rank's chain of shards from 0, all-reduced MIN
    (under FSDP every forward is a collective, so all ranks resume at the same one). Shards past it and
    uncommitted *.tmp are deleted; a point that is not a shard boundary on every rank (not made by this code)
    falls back to 0."""
    chain, end = [], 0
    for s, e, path in _shards(mine):
        if s == end:
            chain.append((s, e, path))
            end = e
    point = torch.tensor([float(end)], device=d.device)                               # [1]
    dist.all_reduce(point, op=dist.ReduceOp.MIN)
    point = int(point.item())
    ok = torch.tensor([float(point == 0 or any(e == point for _, e, _ in chain))], device=d.device)  # [1]
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    point = point if ok.item() > 0 else 0
    keep = {path for _, e, path in chain if e <= point}
    for name in os.listdir(mine):
        if os.path.join(mine, name) not in keep:
            os.remove(os.path.join(mine, name))
    return point


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
    """Reads the pre-pass's shards lazily (key -> shard; a key in several: the later shard, a repeated row's
    last value, as an uninterrupted pre-pass keeps); ref_logp of training rows, checked against their lengths."""

    MAX_OPEN = 64  # shard files kept open at once (krafton_code: ~1,400 shards, over the usual 1,024 descriptors)

    def __init__(self, cache_dir: str, world_size: int):
        self.where: dict[str, str] = {}
        for r in range(world_size):
            legacy = os.path.join(cache_dir, f"rank{r}.safetensors")  # (one file per rank, before the shards)
            shards = [legacy] if os.path.isfile(legacy) else []
            if os.path.isdir(os.path.join(cache_dir, f"rank{r}")):
                shards += [path for _, _, path in _shards(os.path.join(cache_dir, f"rank{r}"))]
            for path in shards:
                with safe_open(path, "pt") as f:
                    self.where.update(dict.fromkeys(f.keys(), path))
        self.open: OrderedDict = OrderedDict()

    def _get(self, key: str) -> torch.Tensor:
        path = self.where[key]
        if path not in self.open:
            if len(self.open) >= self.MAX_OPEN:
                self.open.popitem(last=False)
            self.open[path] = safe_open(path, "pt")
        self.open.move_to_end(path)
        return self.open[path].get_tensor(key)

    def logprobs(self, rows: list[tuple[int, int, int]], width: int, device):
        """ref_logp [b, width - 1] for rows (question qi, response j, its n tokens), 0 after each length; n None:
        a placeholder row (train_step's weight-0 forward), all 0."""
        out = torch.zeros(len(rows), width - 1)                                        # [b, t]
        for k, (qi, j, n) in enumerate(rows):
            if n is None:
                continue
            cached = self._get(f"q{qi}.{j}")                                           # [n - 1]
            if cached.shape[0] != n - 1:
                raise SystemExit(f"error: cached reference log-probs of question {qi}, response {j} cover "
                                 f"{cached.shape[0]} tokens, the data has {n - 1}: the cache is stale")
            out[k, :n - 1] = cached
        return out.to(device)
