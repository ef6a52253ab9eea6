"""The policy's own samples during training: on-policy rollouts, validation after an epoch, samples.jsonl.

Every function here generates with model_utils.generate (collective-free decoding after one all-gather of the
weights) and grades with reward.py / eval.math; cfg is train.py's Config.
"""
from __future__ import annotations

import datetime
import json
import os
import time

import torch
import torch.distributed as dist

import eval.math as eval_math
import exports
import model_utils as mu
import reward
from eval.metrics import summarize
from dist_utils import max_over_ranks, print0

DECODE_STEP_BOUND_S = 0.1  # assumed bound on one decode step of one generate call (7B HF generate: tens of ms)


def resolve_backend(cfg, device_type: str) -> str:
    """rollout.backend=auto: vllm on a CUDA device where the vllm package is importable and the model comes from
    model.path, else hf (printed once); hf and vllm stay as given."""
    if cfg.rollout.backend != "auto":
        return cfg.rollout.backend
    import importlib.util
    why_not = ("no GPU" if device_type != "cuda" else "model.init_config, no model.path" if cfg.model.path is None
               else "no vllm package" if importlib.util.find_spec("vllm") is None else None)
    print0(f"rollout.backend=auto: {'vllm (a GPU and the vllm package)' if why_not is None else f'hf ({why_not})'}")
    return "vllm" if why_not is None else "hf"


def make_engine(cfg, d):
    """rollout.backend=vllm: this rank's vLLM engine (vllm_engine.VllmRollout, started from model.path); else None."""
    if cfg.rollout.backend != "vllm":
        return None
    from vllm_engine import VllmRollout

    return VllmRollout(cfg.model.path, seed=cfg.train.seed * 1_000_003 + d.rank,
                       gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)


def policy_generate(model, tokenizer, prompts: list[list[int]], engine, *, max_new_tokens: int, temperature: float,
                    top_p: float, seed: int, max_batch_tokens: int) -> list[list[int]]:
    """Responses of the current policy: through the vLLM engine (fed the policy's weights first, put to sleep
    after) when there is one, else model_utils.generate. Collective: every rank calls it."""
    if engine is None:
        return mu.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, max_batch_tokens=max_batch_tokens)
    engine.sync(model)
    out = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    engine.sleep()
    return out


def rollout(cfg, d, model, tokenizer, items: list[dict], step: int, engine=None) -> list[dict]:
    """G samples per question from the current policy (policy_generate: vLLM with rollout.backend=vllm; HF
    generate chunked so that prompt + new tokens of a call stay within rollout.max_batch_tokens, the KV-cache
    budget), each scored by reward.py."""
    G = cfg.data.group_size
    prompts = [it["prompt_ids"] for it in items for _ in range(G)]
    responses = policy_generate(model, tokenizer, prompts, engine, max_new_tokens=cfg.rollout.max_new_tokens,
                                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                seed=cfg.train.seed * 1_000_003 + step * d.world_size + d.rank,
                                max_batch_tokens=cfg.rollout.max_batch_tokens)
    fresh = []
    for i, it in enumerate(items):
        resp = responses[i * G:(i + 1) * G]
        texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
        fresh.append({**it,
                      "input_ids": [it["prompt_ids"] + r for r in resp],
                      "loss_mask": [[0] * len(it["prompt_ids"]) + [1] * len(r) for r in resp],
                      "rewards": [reward.score(t, it["gold"]) if it["gold"] is not None else 0.0 for t in texts],
                      "texts": texts})
    return fresh


def generated_tokens(d, items: list[dict]) -> int:
    """Tokens the policy generated for these rollouts, summed over ranks (the response tokens: loss_mask = 1)."""
    n = torch.tensor([float(sum(sum(m) for it in items for m in it["loss_mask"]))], dtype=torch.float64,
                     device=d.device)                                                  # [1]
    dist.all_reduce(n)
    return int(n.item())


def validate_epoch(cfg, d, model, tokenizer, records: list[dict], metrics, *, epoch: int, step: int,
                   engine=None) -> None:
    """After epoch `epoch`: every rank samples validation.n answers to its share of the problems (r::world,
    mu.generate: collective-free decoding), grades them with eval.math.grade; rank 0 summarises them
    (eval.metrics.summarize), logs a metrics row with val/ keys, and -- after the hf/epoch-N export --
    points hf/best at that export (a relative symlink, exports.link) with best.json when its val/avg@n beats the
    best so far (ties: earlier)."""
    vc = cfg.validation
    t0 = time.time()
    instruction = eval_math.BOXED_INSTRUCTION if vc.instruction else ""
    mine = records[d.rank::d.world_size]
    prompt_ids = [tokenizer(eval_math.build_prompt(tokenizer, rec["problem"], instruction),
                            add_special_tokens=False)["input_ids"] for rec in mine]
    group = _gather_group(cfg, d, [len(p) for p in prompt_ids for _ in range(vc.n)])
    responses = policy_generate(model, tokenizer, [p for p in prompt_ids for _ in range(vc.n)], engine,
                                max_new_tokens=vc.max_new_tokens, temperature=vc.temperature, top_p=vc.top_p,
                                seed=cfg.train.seed * 1_000_003 + epoch * 7919 + d.rank,
                                max_batch_tokens=cfg.rollout.max_batch_tokens)
    samples = []
    for i, resp in enumerate(responses):
        done = tokenizer.eos_token_id in resp
        text = tokenizer.decode(resp, skip_special_tokens=True)
        samples.append(eval_math.grade(mine[i // vc.n], i % vc.n, text, len(resp), not done))
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, samples, group=group)  # (early ranks wait here for the slowest)
    dist.destroy_process_group(group)
    exports.export(model, tokenizer, os.path.join(cfg.output_dir, "hf"), f"epoch-{epoch}", step, dist=d,
                   keep_steps=cfg.train.keep_hf)
    if d.rank == 0:
        summary = summarize([s for part in gathered for s in part])
        scores = {f"val/{k}": v for k, v in summary.items() if k.startswith(("avg@", "pass@", "maj@"))}
        cost = {"val/tokens_generated": sum(s["length"] for part in gathered for s in part),
                "val/seconds": time.time() - t0}  # (sampling, grading and the epoch's export)
        metrics.log({"step": step, "val/epoch": epoch, **scores, **cost})
        print0(f"validation after epoch {epoch} (step {step}): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        best_path = os.path.join(cfg.output_dir, "best.json")
        best = None
        if os.path.exists(best_path):
            with open(best_path) as f:
                best = json.load(f)
        if best is None or scores["val/avg@n"] > best["scores"]["val/avg@n"] or best["epoch"] == epoch:
            exports.link(f"epoch-{epoch}", os.path.join(cfg.output_dir, "hf", "best"))  # a link, not a 15 GB copy
            with open(best_path + ".tmp", "w") as f:
                json.dump({"epoch": epoch, "step": step, "scores": scores}, f)
            os.replace(best_path + ".tmp", best_path)  # (a kill between the two: the resumed run repeats this)
    dist.barrier()


def _gather_group(cfg, d, prompt_lengths: list[int]):
    """A gloo group for validation's gather, made before decoding (its creation is collective), whose timeout
    covers the slowest rank's decoding: train.collective_timeout_s + the most generate calls any rank makes x
    validation.max_new_tokens x DECODE_STEP_BOUND_S. Ranks decode collective-free, so the early ones wait in
    that gather for as long as the slowest takes -- longer than the default group's timeout allows."""
    calls = len(mu.generation_chunks(prompt_lengths, cfg.validation.max_new_tokens, cfg.rollout.max_batch_tokens))
    budget = max_over_ranks(calls, d.device) * cfg.validation.max_new_tokens * DECODE_STEP_BOUND_S
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.train.collective_timeout_s + budget))


def write_samples(cfg, d, model, tokenizer, items: list[dict], step: int) -> None:
    """samples.jsonl: on-policy, the rollouts this step trained on; otherwise a fresh greedy answer to this
    rank's first question (all ranks generate; rank 0 writes its own)."""
    if cfg.loss.name == "onpolicy":
        shown = [{"gold": it["gold"], "rewards": it["rewards"][:2], "texts": it["texts"][:2]} for it in items[:2]]
    else:
        resp = mu.generate(model, tokenizer, [items[0]["prompt_ids"]], max_new_tokens=cfg.rollout.max_new_tokens,
                           temperature=0.0, top_p=1.0, seed=cfg.train.seed,
                           max_batch_tokens=cfg.rollout.max_batch_tokens)
        texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
        gold = items[0]["gold"]
        shown = [{"gold": gold, "rewards": [reward.score(texts[0], gold) if gold is not None else 0.0],
                  "texts": texts}]
    if d.rank == 0:
        with open(os.path.join(cfg.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": step, **s}) + "\n" for s in shown)
