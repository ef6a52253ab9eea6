"""Model plumbing: FSDP2 model building, log-probs, generation, HF-format save (dist_utils.py: the process
group; checkpoint.py: the resumable state).

build_model does, in torchtitan's fixed order:
  1. construct the HF causal LM on the meta device (no memory, no init cost), fp32 master weights;
  2. activation checkpointing per decoder layer (checkpoint_wrapper, non-reentrant);
  3. fully_shard per decoder layer, then fully_shard the root (embeddings, final norm, lm_head),
     MixedPrecisionPolicy(param_dtype, reduce_dtype); gradients are SUMMED over ranks, not averaged,
     because the loss is normalised once by the global sequence count (DESIGN.md section 1);
  4. to_empty(device), recompute non-persistent buffers (rotary inv_freq), then rank 0 reads the full
     weights (safetensors or a seeded HF init) and set_model_state_dict broadcasts + shards them.

FSDP2 facts this file relies on (DESIGN.md section 7):
  - model.sequence_logprobs is registered with register_fsdp_forward_method, so inside it the root's
    parameters (lm_head.weight) are unsharded plain Parameters and its gradient lands as a DTensor.
  - after a forward without backward the root stays unsharded until model.reshard(); every helper here
    that runs without backward (sequence_logprobs under no_grad, generate) reshards before returning,
    so optimizers and state dicts always see the sharded DTensor parameters.
"""
import json
import os
import shutil
import types

import safetensors.torch
import torch
import torch.distributed as tdist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch._guards import detect_fake_mode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, Qwen2Config

import fused_logprob
import packing
from checkpoint import replace_dir
from dist_utils import Dist


# --------------------------------------------------------------------------- model building
def _decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers (Qwen2/Llama/Mistral layout: <base_model_prefix>.layers)."""
    layers = getattr(getattr(model, model.base_model_prefix), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected {model.base_model_prefix}.layers to be a ModuleList")
    return layers


def _param_aliases(model) -> dict[str, str]:
    """{alias name: first name} for parameters registered under several names (tied embeddings)."""
    first, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name.replace("_checkpoint_wrapped_module.", "")
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Full state dict from model.safetensors or a sharded model.safetensors.index.json (HF layout)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return safetensors.torch.load_file(single)
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(safetensors.torch.load_file(os.path.join(path, shard)))
    return state


def build_model(*, path: str | None, init_config: dict | None, dist: Dist, param_dtype: torch.dtype,
                reduce_dtype: torch.dtype, activation_checkpointing: bool, trust_remote_code: bool = False,
                seed: int = 0, requires_grad: bool = True, reshard_after_forward: bool = True,
                shard_layers: bool = True, attn_implementation: str = "sdpa", load_weights: bool = True):
    """FSDP2-sharded HF causal LM from `path` (HF dir with config.json + safetensors) or, for the tiny lab,
    from Qwen2Config(**init_config) with the HF init under torch.manual_seed(seed). Exactly one is given.
    requires_grad=False gives the frozen reference model (eval mode, root resharded after every forward).
    reshard_after_forward=False keeps each layer's gathered parameters from its forward to its backward
    (one all-gather per layer per micro-batch instead of two; costs one full model copy per rank).
    shard_layers=False makes the whole model one FSDP unit (one all-gather and one reduce-scatter per
    micro-batch, no per-layer overlap): for models so small that per-layer collectives cost more than
    they overlap (the tiny lab: 15% faster per step on 2 CPU ranks); reshard_after_forward is then moot.
    attn_implementation: transformers' attention (sdpa | eager | flex_attention | flash_attention_2).
    load_weights=False: the parameters are left as allocated, unread (a resume, whose checkpoint overwrites every
    one of them: reading and broadcasting 15 GB of base weights first would be wasted)."""
    if (path is None) == (init_config is None):
        raise ValueError("build_model: give exactly one of path and init_config")
    fake = detect_fake_mode() is not None  # a FakeTensorMode rehearsal (benchmarks/memory.py): shapes, no values
    if path is not None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in model path {path}")
        if not fake and not any(os.path.isfile(os.path.join(path, f))
                   for f in ("model.safetensors", "model.safetensors.index.json")):
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in model path {path}")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        config = Qwen2Config(**init_config)

    # dtype=float32: sharded master weights stay fp32 whatever the checkpoint's dtype; param_dtype
    # (bf16 at scale) is only the all-gathered compute copy. from_config overwrites config.dtype, so the
    # storage dtype (what save_hf writes) is put back afterwards.
    storage_dtype = config.dtype or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    model.config.architectures = [type(model).__name__]  # before fully_shard renames the class to FSDP...
    aliases = _param_aliases(model)
    model.requires_grad_(requires_grad)

    layers = _decoder_layers(model)
    if activation_checkpointing:
        # The module wrapper (torchtitan's choice) rather than HF's gradient_checkpointing_enable: the
        # wrapped layer is what fully_shard sees, recompute is visible in this one function, and
        # state-dict FQNs stay HF's (the wrapper strips its prefix; DCP's helpers do too).
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    mesh = dist.mesh if dist.mesh is not None else init_device_mesh(dist.device.type, (dist.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in layers if shard_layers else []:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # Tied embed_tokens/lm_head are one Parameter owned by the root group, so they stay shared.
    # The root of a model without backward reshards after forward; the training root keeps its
    # parameters for the backward that follows (FSDP's default for roots).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True if not requires_grad else None)
    model.layer_reshard_after_forward = reshard_after_forward  # (generate switches it off and back)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average, over ranks: the loss is already divided by the global sequence count.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)

    model.to_empty(device=dist.device)
    # to_empty leaves non-persistent buffers (rotary inv_freq) as uninitialised memory; they are not in
    # any state dict, so recompute them with the model's own init for those modules (HF's _init_weights
    # handles *RotaryEmbedding; a remote-code model with other such buffers needs its own line here).
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)

    if load_weights and not fake:  # (fake tensors: values do not change memory, the broadcast needs host syncs)
        _load_full_weights(model, path, config, aliases, dist=dist, seed=seed, trust_remote_code=trust_remote_code)
    model.config.dtype = storage_dtype  # (after the last from_config, which sets it again)

    model.sequence_logprobs = types.MethodType(_sequence_logprobs, model)
    register_fsdp_forward_method(model, "sequence_logprobs")
    model.train(requires_grad)
    return model


def _load_full_weights(model, path, config, aliases, *, dist: Dist, seed: int, trust_remote_code: bool) -> None:
    """Rank 0 reads the full weights (safetensors, or a seeded HF init for init_config) and
    set_model_state_dict broadcasts them tensor by tensor, in rank 0's dtype, into every rank's fp32 shards."""
    state = {}
    if dist.rank == 0:
        if path is not None:
            state = _read_safetensors(path)
        else:
            torch.manual_seed(seed)
            state = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code).state_dict()
        for alias, name in aliases.items():  # HF drops tied copies (lm_head.weight) from safetensors
            if alias not in state:
                state[alias] = state[name]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def num_params(model) -> int:
    """Number of distinct parameters of the full (unsharded) model; DTensor.numel() is the global size."""
    return sum(p.numel() for p in model.parameters())


def model_summary(model) -> str:
    """One line for logs."""
    c = model.config
    return (f"{c.architectures[0]}: {num_params(model) / 1e6:.2f}M params, {c.num_hidden_layers} layers, "
            f"hidden {c.hidden_size}, vocab {c.vocab_size}, tied {c.tie_word_embeddings}")


# --------------------------------------------------------------------------- log-probs
def _sequence_logprobs(self, input_ids, attention_mask, position_ids, targets, temperature, backend, return_entropy):
    """Bound to the model as model.sequence_logprobs (an FSDP forward method; see module docstring).
    use_cache=False also matters for packed rows: with a cache transformers ignores their boundaries."""
    backbone = getattr(self, self.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # [B, T, H]
    out = fused_logprob.fused_logprobs(hidden[:, :-1].reshape(targets.numel(), -1), self.get_output_embeddings().weight,
                                       targets.reshape(-1), temperature=temperature, ignore_index=-100,
                                       return_entropy=return_entropy, backend=backend)
    return out  # flat [B*(T-1)]: FSDP hooks the output for backward, and warns if it is a view


def _call_logprobs(model, input_ids, attention_mask, position_ids, targets, temperature, backend, return_entropy):
    out = model.sequence_logprobs(input_ids, attention_mask, position_ids, targets, temperature, backend,
                                  return_entropy)
    if not torch.is_grad_enabled():  # no backward will reshard the root
        model.reshard()
    return out if return_entropy else (out,)


def sequence_logprobs(model, input_ids, attention_mask, *, temperature=1.0, backend="auto",
                      return_entropy=False):
    """logp[b, t] = log softmax(lm_head(h[b, t]) / temperature)[input_ids[b, t+1]]  -> [B, T-1] fp32,
    0 where attention_mask[b, t+1] == 0 (and entropy [B, T-1] of the same distribution when asked).
    The [B*T, V] logits are never materialised (fused_logprob). Without grad (reference / old-policy
    passes) the root is resharded afterwards, since no backward will do it."""
    # positions count real tokens, so right- and left-padded rows both get HF's positions
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                 # [B, T]
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)           # [B, T-1]
    out = _call_logprobs(model, input_ids, attention_mask, position_ids, targets, temperature, backend,
                         return_entropy)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    return (out[0].view(shape), out[1].view(shape)) if return_entropy else out[0].view(shape)


def packed_logprobs(model, packed: dict, width: int, *, temperature=1.0, backend="auto", return_entropy=False):
    """sequence_logprobs of k sequences from ONE forward over their packed row (packing.pack: input_ids and
    position_ids [1, L], lengths), no padding: attention stays inside each sequence (see packing.py for why
    attention_mask=None is what makes that so). Returns logp (and entropy) in the unpacked layout [k, width - 1],
    row i holding its sequence's n_i - 1 predictions and then 0, as sequence_logprobs gives for padded rows."""
    device = next(model.parameters()).device
    input_ids = packed["input_ids"].to(device)                                          # [1, L]
    targets = packing.packed_targets(input_ids, packed["lengths"])                      # [1, L-1]
    out = _call_logprobs(model, input_ids, None, packed["position_ids"].to(device), targets, temperature, backend,
                         return_entropy)
    rows = tuple(packing.unpack(o, packed["lengths"], width) for o in out)              # [k, width-1] each
    return rows if return_entropy else rows[0]


# --------------------------------------------------------------------------- generation
def _trim_response(ids: list[int], eos_id: int) -> list[int]:
    """Cut after the first eos (kept, so the loss can learn to stop). HF pads only rows that finished, so a
    row without eos ran to max_new_tokens and is returned whole (a sampled pad id in it is a real token)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def generation_chunks(prompt_lengths: list[int], max_new_tokens: int, max_batch_tokens: int) -> list[slice]:
    """Consecutive slices of the prompts such that each call's KV cache stays within max_batch_tokens:
    rows x (longest prompt in the slice + max_new_tokens) <= max_batch_tokens (a single row may exceed it)."""
    chunks, start, width = [], 0, 0
    for i, n in enumerate(prompt_lengths):
        wider = max(width, n)
        if i > start and (i - start + 1) * (wider + max_new_tokens) > max_batch_tokens:
            chunks.append(slice(start, i))
            start, wider = i, n
        width = wider
    return chunks + [slice(start, len(prompt_lengths))] if prompt_lengths else chunks


@torch.no_grad()
def generate(model, tokenizer, prompts_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, seed: int, max_batch_tokens: int = 2**62) -> list[list[int]]:
    """Sample responses to prompts (greedy when temperature == 0), in left-padded calls of at most
    max_batch_tokens prompt + new tokens (generation_chunks: the KV-cache budget). All ranks must call it
    together: every layer is all-gathered once up front and decoding then runs on the full parameters
    without any collective (reshard_after_forward is switched off for the call -- the FSDP2 eval recipe;
    one unsharded model copy per rank), so ranks stop independently and may make different numbers of
    calls. `seed` seeds this call only (global RNG untouched); fold rank/step into it for distinct streams."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature if sample else None, top_p=top_p if sample else None,
                                  top_k=0 if sample else None,  # HF's default top_k=50 would truncate
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    model.set_reshard_after_forward(False)  # keep every layer gathered after its first forward
    for module in model.modules():  # gather all layers now, on every rank, before any rank can stop early
        if isinstance(module, FSDPModule):
            module.unshard()
    responses = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in generation_chunks([len(p) for p in prompts_ids], max_new_tokens, max_batch_tokens):
            prompts = prompts_ids[chunk]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                                 synced_gpus=False)  # [b, width + new]
            responses += [_trim_response(row.tolist(), tokenizer.eos_token_id) for row in out[:, width:]]
    model.train(was_training)
    model.set_reshard_after_forward(model.layer_reshard_after_forward)  # back to build_model's settings
    if any(p.requires_grad for p in model.parameters()):
        model.set_reshard_after_forward(False, recurse=False)  # a training root keeps them for backward
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return responses


# --------------------------------------------------------------------------- HF-format save


def save_hf(model, tokenizer, out_dir: str, *, dist: Dist, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write an HF model dir via out_dir.tmp -> out_dir: safetensors in config.dtype (the loaded checkpoint's;
    fp32 for init_config), sharded with model.safetensors.index.json above max_shard_bytes, tied copies
    left out (HF re-ties on load), config.json, generation_config.json (eos/pad from the tokenizer where
    unset, so HF generate stops at end-of-turn), tokenizer files. Collective: all ranks call it.
    Each tensor is cast to the storage dtype on its shard, then all-gathered (in that dtype) and offloaded to
    rank 0's host one at a time: rank 0 holds the written bytes (7B bf16: 15 GB), never a full fp32 copy (30 GB)."""
    aliases = _param_aliases(model)
    state = {}
    for name, t in get_model_state_dict(model).items():  # sharded DTensors: no gather, no copy yet
        if name in aliases:
            continue
        t = t.to(model.config.dtype)                                                    # cast the local shard
        t = t.full_tensor() if hasattr(t, "full_tensor") else t                         # gather in that dtype
        if dist.rank == 0:
            state[name] = t.cpu().contiguous()
        del t
    if dist.rank == 0:
        shards, size = [{}], 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards, size = shards + [{}], 0
            shards[-1][name], size = t, size + nbytes
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            safetensors.torch.save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        model.config.save_pretrained(tmp)
        gen = model.generation_config
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        gen.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    tdist.barrier()


