"""Per-rank peak GPU memory of the real job, rehearsed on a CPU under fake tensors.

    python benchmarks/memory.py configs/bias05.yaml [section.key=value ...] --world 8 --gpu-memory 80 [--json F]

train.py's own code paths run at the real model's shapes without its weights: train.build_models (meta-device
build, activation checkpointing, fully_shard per layer, bf16 MixedPrecisionPolicy, AdamW), train.logprobs
(the fused log-prob, Triton path as on CUDA) and train.micro_batch_loss (the configured loss and KL),
backward, the grad-norm clip and the optimizer step, inside torch's FakeTensorMode with a fake process group
of world N (torch.testing._internal.distributed.fake_pg) on a "cpu" mesh built outside fake mode.
FSDPMemTracker (torch.distributed._tools, torchtitan's estimator works this way) records each phase's peak
by category. Every micro-batch is the largest train.py forms (micro_batch_lengths): micro_batch_size sequences
of data.max_len tokens, or with train.micro_batch_tokens one packed row of at least two sequences.

Phases (each one's peak includes the persistent state alive at that point; a live reference model's sharded
weights are added to every phase, since the tracker follows one root module):
  ref_prepass  cached reference log-probs: no-grad forwards before the first update (no optimizer state yet)
               (dpo: also the shape of its per-step no-grad pass 1; that pass runs with AdamW's state allocated but
               no gradients, so train_step, the same forward with grad and the same state, bounds it)
  train_step   two micro-batches' forward + backward with the optimizer step between them (the second sees
               AdamW's state)
  optimizer_step  the clip and AdamW step, computed from the shards (see phase_optimizer_step)
  rollout      on-policy: every layer all-gathered as mu.generate does (measured) + the KV cache of the
               largest generate call and one decode step's logits (computed from the shapes: HF generate's
               stopping checks are host syncs, which fake tensors cannot do)
  validation   the same for validation sampling (validation.every_epochs > 0)
               (rollout.backend=vllm: both phases are phase_vllm_rollout -- the engine's preallocation and the
               weight sync's largest transient, computed; the policy stays sharded)
  hf_export    each parameter cast to the storage dtype on its shard, gathered in full and dropped in turn, as
               model_utils.save_hf does (the full state dict in that dtype sits in rank 0's host memory: host_gib)

The model's config.json comes from model.path when that directory exists, else from configs/models/<name of
model.path> (shipped, so this runs offline). Exit 1 when a phase's peak exceeds --gpu-memory minus --reserve
(the CUDA context, NCCL buffers and allocator fragmentation that the tracker cannot see), 2 on bad input.
"""
import dataclasses
import json
import os
import sys
import time
import types

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import dist_utils
import loss as L  # noqa: E402
import model_utils as mu  # noqa: E402
import packing  # noqa: E402
import train  # noqa: E402

GIB = 2**30
CATEGORIES = {  # FSDPMemTracker's categories, grouped as the README reports them
    "parameters": ("Sharded Param", "Unsharded Param", "All Gather", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer": ("OptState",),
    "activations": ("Activation",),
    "temporaries": ("Temp", "Inputs"),
}


def model_config_dir(cfg) -> str:
    """Where the model's config.json is read from (the real directory, else the shipped copy)."""
    if cfg.model.path is None:
        cli.fail("memory.py", "model.init_config configs are the tiny lab; rehearse a model.path config")
    if os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        return cfg.model.path
    shipped = os.path.join(ROOT, "configs", "models", os.path.basename(os.path.normpath(cfg.model.path)))
    if not os.path.isfile(os.path.join(shipped, "config.json")):
        cli.fail("memory.py", f"model.path {cfg.model.path}: no config.json there nor in {shipped}")
    return shipped


def peak(tracker) -> dict:
    """The tracker's peak snapshot (one device) grouped into CATEGORIES, in GiB."""
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by_name = {getattr(k, "value", k): v for k, v in snap.items()}  # keys are str-valued enums and "Total"
    out = {name: sum(by_name.get(k, 0) for k in keys) / GIB for name, keys in CATEGORIES.items()}
    return {"peak_gib": by_name["Total"] / GIB, **out}


def micro_batch_lengths(cfg) -> list[int]:
    """The sequence lengths of the largest micro-batch train.py forms: micro_batch_size sequences of data.max_len
    tokens, or with train.micro_batch_tokens one packed row filled to max(budget, max_len) tokens (a sequence
    longer than the budget goes alone) in at least two equal sequences, so that sdpa's [L, L] packed mask exists."""
    T = cfg.data.max_len
    if not cfg.train.micro_batch_tokens:
        return [T] * cfg.train.micro_batch_size
    total = max(cfg.train.micro_batch_tokens, T)
    k = max(2, -(-total // T))
    return [total // k + (j < total % k) for j in range(k)]


def fake_batch(cfg, lengths: list[int]):
    """A micro-batch of sequences of `lengths` tokens, prompt min(1,024, n / 4) tokens each (real CPU tensors,
    like packing.make_batch's output; the model sees fake ones after .to(device)), packed as train.py packs it
    when train.micro_batch_tokens is set."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        width = max(lengths)
        pos = torch.arange(width)[None]                                                # [1, T]
        n = torch.tensor(lengths)[:, None]                                             # [b, 1]
        prompt = torch.tensor([min(1024, x // 4) for x in lengths])[:, None]           # [b, 1]
        batch = {"input_ids": torch.zeros(len(lengths), width, dtype=torch.long),
                 "attention_mask": (pos < n).long(), "loss_mask": ((pos >= prompt) & (pos < n)).float()}
        if cfg.train.micro_batch_tokens:
            batch["packed"] = packing.pack([torch.zeros(x, dtype=torch.long) for x in lengths])
        return batch


class ZeroRefCache:
    """Stands in for reference.RefCache (files on disk) with its interface: ref_logp [b, width - 1] of zeros."""

    def logprobs(self, rows, width, device):
        return torch.zeros(len(rows), width - 1).to(device)


def through_call(model):
    """Route model.sequence_logprobs through the module's __call__ (forward = the log-prob method), so the
    tracker sees the root's pre-forward; a register_fsdp_forward_method wrapper leaves it without (KeyError in
    its pre-backward hook). The computation is the same function."""
    model.forward = types.MethodType(mu._sequence_logprobs, model)
    model.sequence_logprobs = model.__call__


def phase_ref_prepass(cfg, d, model, tracker_cls):
    batch = fake_batch(cfg, micro_batch_lengths(cfg))
    with tracker_cls(model) as t, torch.no_grad():
        train.logprobs(cfg, d, model, batch)
    return peak(t)


def phase_train_step(cfg, d, model, ref_model, optimizer, tracker_cls):
    lengths = micro_batch_lengths(cfg)
    batch = fake_batch(cfg, lengths)
    adv, rewards = torch.ones(len(lengths)), torch.ones(len(lengths))  # (fake: they meet fake logp on the device)
    n = float(cfg.train.questions_per_step * cfg.data.group_size)
    counts = train.StepCounts(num_seqs=n, num_tokens=n * cfg.data.max_len)
    ref_cache = ZeroRefCache() if cfg.loss.kl_coef > 0 and cfg.loss.ref_logprobs == "cached" else None
    rows = [(0, j, n) for j, n in enumerate(lengths)]
    peaks = []
    for _ in range(2):  # the second iteration runs with AdamW's state allocated
        with tracker_cls(model, optimizer) as t:
            if cfg.loss.name == "dpo":  # dpo.backward's pass 2 (its no-grad pass 1 has ref_prepass's shapes)
                mask = batch["loss_mask"][:, 1:].to(d.device)                           # [b, t]
                loss = L.sequence_logp(train.logprobs(cfg, d, model, batch), mask).sum()
            else:
                loss, _ = train.micro_batch_loss(cfg, d, model, ref_model, ref_cache, batch, adv, rewards, rows,
                                                 counts)
            loss.backward()
        peaks.append(peak(t))
        # Untracked: FSDPMemTracker counts in-place foreach ops on DTensors (clip_grad_norm_'s scaling, AdamW's
        # updates) at their global size, world x the shards (28.4 GiB at 7B, 8 ranks: an artefact). The step's
        # own peak is computed in phase_optimizer_step.
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return max(peaks, key=lambda p: p["peak_gib"])


def phase_optimizer_step(model):
    """Computed from the shards: fp32 parameters + gradients + AdamW's two moments + one fp32 temporary per
    parameter (foreach AdamW's sqrt of the second moment)."""
    shard = sum(p.to_local().numel() * 4 for p in model.parameters()) / GIB
    return {"peak_gib": 5 * shard, "parameters": shard, "gradients": shard, "optimizer": 2 * shard,
            "activations": 0.0, "temporaries": shard, "computed": ["all"]}


def phase_generation(cfg, model, optimizer, tracker_cls, *, rank_samples: int, max_new_tokens: int):
    """mu.generate's memory. Measured: the policy with every FSDP unit unsharded (generate's first step).
    Computed: the KV cache of the largest call (rollout.max_batch_tokens, capped by the rank's samples) and one
    decode step's logits (the 16-bit logits and their fp32 copy, [rows, V])."""
    with tracker_cls(model, optimizer) as t:
        for module in model.modules():
            if isinstance(module, torch.distributed.fsdp.FSDPModule):
                module.unshard()
        measured = peak(t)
        for module in model.modules():
            if isinstance(module, torch.distributed.fsdp.FSDPModule):
                module.reshard()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype_bytes = 2 if train.compute_dtype(cfg, "cuda") == torch.bfloat16 else 4
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype_bytes
    seq = max(1, cfg.data.max_len - max_new_tokens) + max_new_tokens  # prompt budget + new tokens
    rows = max(1, min(rank_samples, cfg.rollout.max_batch_tokens // seq))
    kv = rows * seq * kv_per_token / GIB
    logits = rows * c.vocab_size * (dtype_bytes + 4) / GIB
    out = dict(measured)
    out.update(peak_gib=measured["peak_gib"] + kv + logits, kv_cache_gib=kv, logits_gib=logits,
               rows_per_call=rows, calls=-(-rank_samples // rows), computed=["kv_cache_gib", "logits_gib"])
    out["activations"] += kv + logits
    return out


def phase_vllm_rollout(cfg, model, optimizer, tracker_cls, *, gpu_memory_gib: float):
    """rollout.backend=vllm (vllm_engine.py). Measured: the persistent state (the policy stays sharded). Computed:
    the engine's preallocation, rollout.vllm_gpu_memory_utilization x the GPU's memory (its weights and KV cache
    live inside it), and the sync's largest transient: one decoder layer's full weights in bf16 plus one full
    fp32 parameter. Outside rollouts the engine sleeps at level 2: its weights are dropped, not kept in host
    memory (host_gib 0; every sync loads them all again)."""
    with tracker_cls(model, optimizer) as t:
        measured = peak(t)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    layer = max(sum(p.numel() for p in m.parameters()) for m in layers) if layers else 0
    largest = max(p.numel() for p in model.parameters())
    sync = (layer * 2 + largest * 4) / GIB
    engine = cfg.rollout.vllm_gpu_memory_utilization * gpu_memory_gib
    out = dict(measured)
    out.update(peak_gib=measured["peak_gib"] + engine + sync, engine_gib=engine, sync_gib=sync,
               host_gib=0.0, computed=["engine_gib", "sync_gib"])
    out["activations"] += engine
    out["temporaries"] += sync
    return out


def validation_samples(cfg, world: int) -> int:
    """Samples one rank draws at a validation: n x its share of the problems (the file's count when it is here,
    else the budget is taken as filled)."""
    vc = cfg.validation
    if not os.path.isfile(vc.data):
        return 2**62
    with open(vc.data) as f:
        problems = sum(1 for line in f if line.strip())
    problems = min(problems, vc.limit or problems)
    return vc.n * -(-problems // world)


def phase_hf_export(model, optimizer, tracker_cls):
    """model_utils.save_hf: each parameter cast to the storage dtype on its shard, gathered in it, offloaded to
    rank 0's host one tensor at a time: rank 0 ends up holding the full state dict in the storage dtype."""
    dtype = model.config.dtype or torch.float32
    with tracker_cls(model, optimizer) as t:
        for p in model.parameters():
            full = p.to(dtype).full_tensor()
            del full
    out = peak(t)
    out["host_gib"] = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8 / GIB
    return out


def host_data(cfg) -> dict:
    """Host memory of the training data (token_cache.py): one int32 copy of the drawn questions' ids per node,
    memory-mapped by its ranks (page cache; each rank touches the pages of its own batches). Upper bound: every
    response at data.max_len tokens. Without data.num_questions it is the kept corpus' token count x 4 bytes,
    unknown before curation (None)."""
    k = cfg.data.num_questions
    return {"token_copy_gib_per_node_max": k * cfg.data.group_size * cfg.data.max_len * 4 / GIB if k else None,
            "texts_held": False}


def rehearse(cfg, world: int, gpu_memory: float = 80.0) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    d = dist_utils.Dist(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"),
                mesh=init_device_mesh("cpu", (world,)))  # (outside fake mode)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_config_dir(cfg)))
    if cfg.rollout.backend == "auto":  # rehearsed as its fallback (the KV cache inside the training process);
        cfg.rollout.backend = "hf"     # rollout.backend=vllm rehearses the engine a node with vllm would start
    if cfg.model.logprob_backend == "auto":  # what auto picks on CUDA
        cfg.model.logprob_backend = "triton"
    phases = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, ref_model, optimizer = train.build_models(cfg, d, device_type="cuda")
        through_call(model)
        if ref_model is not None:
            through_call(ref_model)
        if (cfg.loss.kl_coef > 0 or cfg.loss.name == "dpo") and cfg.loss.ref_logprobs == "cached":
            phases["ref_prepass"] = phase_ref_prepass(cfg, d, model, FSDPMemTracker)
        phases["train_step"] = phase_train_step(cfg, d, model, ref_model, optimizer, FSDPMemTracker)
        phases["optimizer_step"] = phase_optimizer_step(model)
        if cfg.loss.name in ("onpolicy", "rft") and cfg.rollout.backend == "vllm":
            phases["rollout"] = phase_vllm_rollout(cfg, model, optimizer, FSDPMemTracker, gpu_memory_gib=gpu_memory)
        elif cfg.loss.name in ("onpolicy", "rft"):
            phases["rollout"] = phase_generation(
                cfg, model, optimizer, FSDPMemTracker, max_new_tokens=cfg.rollout.max_new_tokens,
                rank_samples=cfg.train.questions_per_step // world * cfg.data.group_size)
        if cfg.validation.every_epochs and cfg.rollout.backend == "vllm":
            phases["validation"] = phase_vllm_rollout(cfg, model, optimizer, FSDPMemTracker, gpu_memory_gib=gpu_memory)
        elif cfg.validation.every_epochs:
            phases["validation"] = phase_generation(cfg, model, optimizer, FSDPMemTracker,
                                                    max_new_tokens=cfg.validation.max_new_tokens,
                                                    rank_samples=validation_samples(cfg, world))
        phases["hf_export"] = phase_hf_export(model, optimizer, FSDPMemTracker)
        if ref_model is not None:  # resident in every phase; FSDPMemTracker tracks one root module only
            ref_gib = sum(p.to_local().numel() * p.element_size() for p in ref_model.parameters()) / GIB
            for name, ph in phases.items():
                ph.update(peak_gib=ph["peak_gib"] + ref_gib, parameters=ph["parameters"] + ref_gib,
                          ref_model_sharded_gib=ref_gib)
    dist.destroy_process_group()
    return phases


def main(argv=None):
    ap = cli.ArgumentParser(prog="memory.py", description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for train.py")
    ap.add_argument("--world", type=int, required=True, help="ranks (GPUs) the job runs on")
    ap.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    ap.add_argument("--reserve", type=float, default=2.0,
                    help="GiB per GPU the tracker cannot see: CUDA context, NCCL buffers, fragmentation (default 2)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    if a.world < 1 or not 0 < a.gpu_memory < float("inf") or not 0 <= a.reserve < float("inf"):
        ap.error(f"--world {a.world} --gpu-memory {a.gpu_memory:g} --reserve {a.reserve:g}: need --world >= 1, "
                 "--gpu-memory > 0, --reserve >= 0")
    why = a.json and cli.unwritable(a.json)
    if why:
        cli.fail("memory.py", f"--json {a.json}: cannot be written: {why}")
    try:
        cfg = train.load_config(a.config, a.overrides, check_paths=False)
    except train.ConfigError as e:
        cli.fail("memory.py", e)
    if cfg.train.questions_per_step % a.world:
        cli.fail("memory.py", f"train.questions_per_step={cfg.train.questions_per_step} is not divisible by "
                 f"--world {a.world}")
    model_config_dir(cfg)  # (its checks, before the rehearsal starts)
    t0 = time.time()
    phases = rehearse(cfg, a.world, a.gpu_memory)
    budget = a.gpu_memory - a.reserve
    fits = all(p["peak_gib"] <= budget for p in phases.values())
    lengths = micro_batch_lengths(cfg)
    shape = (f"packed micro-batches of {cfg.train.micro_batch_tokens} tokens (rehearsed: {len(lengths)} sequences, "
             f"{sum(lengths)} tokens in one row)" if cfg.train.micro_batch_tokens else
             f"{cfg.data.max_len} tokens x {cfg.train.micro_batch_size} sequences per micro-batch")
    print(f"{a.config}: world {a.world}, {shape}, {cfg.loss.name}, budget {a.gpu_memory:g} GiB - {a.reserve:g} "
          f"reserve ({time.time() - t0:.0f} s)")
    print(f"{'phase':<12} {'peak GiB':>9} " + " ".join(f"{c:>12}" for c in CATEGORIES))
    for name, p in phases.items():
        print(f"{name:<12} {p['peak_gib']:>9.1f} " + " ".join(f"{p[c]:>12.1f}" for c in CATEGORIES)
              + ("" if p["peak_gib"] <= budget else "   DOES NOT FIT"))
    for name in ("rollout", "validation"):
        if name in phases and "engine_gib" in phases[name]:
            r = phases[name]
            print(f"{name}: vLLM engine {r['engine_gib']:.1f} GiB (rollout.vllm_gpu_memory_utilization), weight sync "
                  f"{r['sync_gib']:.1f} GiB, computed; asleep while training: {r['host_gib']:.1f} GiB of host memory")
        elif name in phases:
            r = phases[name]
            print(f"{name}: {r['rows_per_call']} sequences per generate call; KV cache {r['kv_cache_gib']:.1f} GiB "
                  f"and logits {r['logits_gib']:.2f} GiB computed from the shapes")
    print(f"hf_export: rank 0 holds the full state dict in the storage dtype in host memory: "
          f"{phases['hf_export']['host_gib']:.1f} GiB")
    host = host_data(cfg)
    print("data (host): " + (f"the token copy of the {cfg.data.num_questions} drawn questions, at most "
                             f"{host['token_copy_gib_per_node_max']:.1f} GiB per node" if cfg.data.num_questions else
                             "the token copy of every kept question (4 bytes per token)")
          + ", memory-mapped (one page-cache copy shared by the node's ranks); no texts held")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "world": a.world, "gpu_memory_gib": a.gpu_memory, "reserve_gib": a.reserve,
                       "fits": fits, "phases": phases, "host_data": host}, f, indent=2)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
