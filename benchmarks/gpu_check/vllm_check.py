"""gpu_check part 5, vllm: vllm_engine.VllmRollout on the GPU, where vllm is installed (SKIP otherwise).

On a tiny random Qwen2 written here (tests/test_vllm.py's: head_dim 32, init std 0.2 so that greedy answers differ
from problem to problem and are rarely near-ties) and synthetic problems, in one process with the training process
group (dist_utils: world 1, cpu:gloo,cuda:nccl) and the FSDP2 policy (model_utils.build_model, bf16 compute like
the engine):
  1. the engine's greedy answers equal HF generate's (model_utils.generate on the policy);
  2. one weight sync after a perturbation: every policy parameter moved by noise of 0.2 (the weights' own scale);
     before the sync the engine still answers like the old weights, after engine.sync(policy) like the new
     policy, and sync loads one tensor per parameter;
  3. sleep and wake up: engine.sleep() (level 1: KV cache dropped, weights offloaded) frees GPU memory
     (torch.cuda.mem_get_info), a plain wake_up() gives the same answers as before sleeping, and sync() on a
     sleeping engine (the training loop's order: rollout, sleep, train, sync) wakes it and answers the same.
Tolerances: >= 90% of the greedy answers identical (HF and vLLM, both bf16, run different kernels: a near-tie
between two tokens can flip and the rest of that answer follows; tests/test_vllm.py asks 57/60 in fp32 on the CPU),
<= 50% identical to the new policy before the sync (the perturbation must matter), and >= 95% between one engine's
own runs on the same weights (sleep/wake changes no weight; only batch scheduling could differ).
"""
import importlib.util
import os
import random

import torch

from benchmarks.gpu_check import common

SAME_HF, SAME_SELF, SAME_BEFORE = 0.90, 0.95, 0.50


def make_model(work, n_problems):
    """A tiny Qwen2 directory (weights, tokenizer) and n_problems prompts' texts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import synthetic
    os.makedirs(work, exist_ok=True)
    tok = synthetic.build_tokenizer(work)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=synthetic.VOCAB_SIZE, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                      initializer_range=0.2)
    Qwen2ForCausalLM(cfg).save_pretrained(work)
    rng = random.Random(0)
    return [synthetic.make_problem(rng, 1 + i % 3, 5).question for i in range(n_problems)]


def same(a, b):
    return sum(x == y for x, y in zip(a, b))


def perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(torch.randn_like(local) * 0.2)


def free_gib(device):
    return torch.cuda.mem_get_info(device)[0] / common.GIB if device.type == "cuda" else None


def sleep_and_wake(rep, engine, model, prompts, greedy, trim, reference, device):
    """Part 3 of the module docstring; returns its numbers."""
    n = len(prompts)
    before = free_gib(device)
    engine.sleep()
    asleep = free_gib(device)
    freed = None if before is None else asleep - before
    if device.type == "cuda":
        rep.check("sleep frees GPU memory", engine.asleep and freed > 0.5, freed_gib=freed)
    if engine.asleep:
        engine.llm.wake_up()
        engine.asleep = False
    woken = trim(engine.generate(prompts, **greedy))
    rep.check("wake_up: same answers", same(woken, reference) >= SAME_SELF * n, same=same(woken, reference), of=n)
    engine.sleep()
    engine.sync(model)  # wakes the engine first
    synced = trim(engine.generate(prompts, **greedy))
    rep.check("sync on a sleeping engine: same answers", same(synced, reference) >= SAME_SELF * n,
              same=same(synced, reference), of=n)
    return {"freed_gib": freed, "same_after_wake": same(woken, reference),
            "same_after_sleep_sync": same(synced, reference)}


def body(args, rep):
    if importlib.util.find_spec("vllm") is None:
        raise common.Skip("vllm is not installed (pip install vllm, see the README's First run on a GPU)")
    from transformers import AutoTokenizer

    import dist_utils
    import model_utils as mu
    from vllm_engine import VllmRollout

    device = torch.device(args.device)
    n_problems, new_tokens = (8, 16) if args.tiny else (30, 32) if args.quick else (60, 32)
    work = os.path.abspath(os.path.join(args.out, "vllm_model"))
    texts = make_model(work, n_problems)
    d = dist_utils.setup_distributed()
    tok = AutoTokenizer.from_pretrained(work)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the engine's dtype (VllmRollout)
    model = mu.build_model(path=work, init_config=None, dist=d, param_dtype=dtype, reduce_dtype=torch.float32,
                           activation_checkpointing=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for t in texts]
    greedy = dict(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, seed=0)
    eos = tok.eos_token_id
    trim = lambda rs: [r[:r.index(eos) + 1] if eos in r else list(r) for r in rs]  # noqa: E731
    hf_old = trim(mu.generate(model, tok, prompts, **greedy))
    engine = VllmRollout(work, seed=0, max_model_len=512, gpu_memory_utilization=0.3)
    vl_old = trim(engine.generate(prompts, **greedy))
    n = len(prompts)
    rep.check("greedy: engine equals HF", same(vl_old, hf_old) >= SAME_HF * n, same=same(vl_old, hf_old), of=n)
    perturb(model)
    hf_new = trim(mu.generate(model, tok, prompts, **greedy))
    rep.check("the perturbation changes the answers", same(vl_old, hf_new) <= SAME_BEFORE * n,
              same=same(vl_old, hf_new), of=n)
    loaded = engine.sync(model)
    params = len(list(model.parameters()))
    rep.check("sync loads every parameter", loaded == params, loaded=loaded, params=params)
    vl_new = trim(engine.generate(prompts, **greedy))
    rep.check("after the sync: engine equals the new policy", same(vl_new, hf_new) >= SAME_HF * n,
              same=same(vl_new, hf_new), of=n)
    sleep = sleep_and_wake(rep, engine, model, prompts, greedy, trim, vl_new, device)
    engine.close()
    dist_utils.teardown_distributed()
    rep.data.update(problems=n, same_before_sync=same(vl_old, hf_old), same_after_sync=same(vl_new, hf_new),
                    same_stale=same(vl_old, hf_new), loaded=loaded, params=params, sleep=sleep,
                    tolerances={"same_hf": SAME_HF, "same_self": SAME_SELF, "same_before": SAME_BEFORE})
    freed = "" if sleep["freed_gib"] is None else f", sleep freed {sleep['freed_gib']:.1f} GiB"
    return (f"greedy engine = HF on {same(vl_old, hf_old)}/{n}; after perturb + sync {same(vl_new, hf_new)}/{n} "
            f"(stale {same(vl_old, hf_new)}/{n}); {loaded}/{params} tensors synced{freed}; after wake "
            f"{sleep['same_after_wake']}/{n}, after sleep + sync {sleep['same_after_sleep_sync']}/{n}")


if __name__ == "__main__":
    common.run("vllm", body)
