"""Worker for tests/test_model_utils.py, run under torchrun (or plain python for world 1):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_model_utils_worker.py CHECK TMPDIR

CHECK is "logprobs" (sharded vs unsharded HF log-probs, entropy and gradients, tied and untied; generate),
"hf" (save_hf round trip through from_pretrained and build_model(path), bf16 storage) or "state"
(save_state/load_state round trip, into the same and into a fresh model/optimizer).
Every assertion compares against a plain, unsharded HF model in the same process. Exit code != 0 on failure.
"""
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import checkpoint
import dist_utils
import model_utils as mu  # noqa: E402
import safetensors.torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
B, T = 4, 12  # global batch: rank r takes rows r::world_size
TEMP = 0.7


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY["vocab_size"], (B, T), generator=g)  # [B, T]
    lengths = torch.tensor([T, T - 3, T - 5, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()       # [B, T] right padding
    return ids.masked_fill(mask == 0, 0), mask


def reference_model(cfg: dict, seed: int = 0):
    """The same weights build_model(init_config=...) loads, as a plain unsharded HF model."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen2Config(**cfg), dtype=torch.float32)


def reference_logprobs(ref, ids, mask):
    logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / TEMP  # [B, T-1, V]
    lsm = torch.log_softmax(logits, -1)
    logp = lsm.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]                 # [B, T-1]
    ent = -(lsm.exp() * lsm).sum(-1) * mask[:, 1:]                                 # [B, T-1]
    return logp, ent


def full_params(model) -> dict[str, torch.Tensor]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor().detach().clone()
            for n, p in model.named_parameters()}


def assert_sharded(model):
    for n, p in model.named_parameters():
        assert isinstance(p, torch.distributed.tensor.DTensor), f"{n} is not sharded (missing reshard?)"


def close(a, b, what, atol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max abs err {err}"


def check_logprobs(d: dist_utils.Dist, tmp: str):
    ids, mask = batch()
    mine = slice(d.rank, B, d.world_size)
    n_tokens = mask[:, 1:].sum()  # the global normaliser: the summed rank gradients are the full-batch one
    for tie, ckpt in ((False, True), (True, False)):
        cfg = {**TINY, "tie_word_embeddings": tie}
        model = mu.build_model(path=None, init_config=cfg, dist=d, param_dtype=torch.float32,
                               reduce_dtype=torch.float32, activation_checkpointing=ckpt, seed=0)
        ref = reference_model(cfg)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        assert mu.num_params(model) == sum(p.numel() for p in ref.parameters()), mu.model_summary(model)
        got = full_params(model)
        for n, p in ref.named_parameters():
            assert torch.equal(got[n], p), f"weight {n} differs after load"

        # no-grad pass (reference / old-policy style): values match and the root is resharded after
        with torch.no_grad():
            logp = mu.sequence_logprobs(model, ids[mine], mask[mine], temperature=TEMP)
        assert_sharded(model)
        ref_logp, ref_ent = reference_logprobs(ref, ids, mask)
        assert logp.dtype == torch.float32 and logp.shape == (len(ids[mine]), T - 1)
        close(logp, ref_logp[mine].detach(), f"logp tie={tie}")

        # training pass: gradients (summed over ranks by FSDP) equal the unsharded full-batch gradients
        logp, ent = mu.sequence_logprobs(model, ids[mine], mask[mine], temperature=TEMP, return_entropy=True)
        close(ent, ref_ent[mine].detach(), f"entropy tie={tie}")
        (-(logp.sum() + 0.1 * ent.sum()) / n_tokens).backward()
        (-(ref_logp.sum() + 0.1 * ref_ent.sum()) / n_tokens).backward()
        assert_sharded(model)
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
        for n, p in ref.named_parameters():
            assert isinstance(grads[n], torch.distributed.tensor.DTensor), n
            close(grads[n].full_tensor(), p.grad, f"grad {n} tie={tie}")
            assert p.grad.abs().sum() > 0, n

    # generate (with the tied model of the last iteration): greedy equals the unsharded model's greedy
    # continuation; ranks get prompts of different lengths and budgets, so one rank stops decoding first
    # (no collective may run after the gather at the start)
    class Tok:  # generate only needs these two ids
        eos_token_id, pad_token_id = 2, 0
    prompts = [[5, 6, 7, 8, 9][: 3 + d.rank], [10, 11]]
    out = mu.generate(model, Tok, prompts, max_new_tokens=4 + 2 * d.rank, temperature=0.0, top_p=1.0, seed=0)
    assert_sharded(model)
    # rank 0: one call for both prompts; the last rank: a KV budget of one sequence per call (two calls, no
    # collective between them); the same greedy answers
    budget = 1 if d.rank == d.world_size - 1 else 2**62
    chunked = mu.generate(model, Tok, prompts, max_new_tokens=4 + 2 * d.rank, temperature=0.0, top_p=1.0, seed=0,
                          max_batch_tokens=budget)
    assert chunked == out, (chunked, out)
    assert_sharded(model)
    for p, o in zip(prompts, out):
        expect = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=4 + 2 * d.rank, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert o == mu._trim_response(expect[0, len(p):].tolist(), 2), (o, expect)
    sampled = mu.generate(model, Tok, prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    assert sampled == mu.generate(model, Tok, prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    assert all(len(s) <= 5 for s in sampled)
    assert_sharded(model)


def trained_tied_model(d: dist_utils.Dist):
    """A tied tiny model with AdamW after one step (so the optimizer has state), and its step function."""
    ids, mask = batch()
    model = mu.build_model(path=None, init_config={**TINY, "tie_word_embeddings": True}, dist=d,
                           param_dtype=torch.float32, reduce_dtype=torch.float32, activation_checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(m=model, o=opt):
        (-mu.sequence_logprobs(m, ids, mask).sum() / mask.sum()).backward()
        o.step()
        o.zero_grad()
    train_step()
    return model, opt, train_step


def check_hf(d: dist_utils.Dist, tmp: str):
    import synthetic
    tok_dir = os.path.join(tmp, "tok")
    if d.rank == 0:
        synthetic.build_tokenizer(tok_dir)
    torch.distributed.barrier()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ids, mask = batch()
    model, _, _ = trained_tied_model(d)

    # --- save_hf (forced into 2 shards + index), twice to the same dir: from_pretrained gives the same logp
    hf_dir = os.path.join(tmp, "hf")
    mu.save_hf(model, tokenizer, hf_dir, dist=d)
    mu.save_hf(model, tokenizer, hf_dir, dist=d, max_shard_bytes=20_000)
    assert sorted(os.listdir(tmp)) == ["hf", "tok"], os.listdir(tmp)  # no .tmp / .old left behind
    with torch.no_grad():
        logp = mu.sequence_logprobs(model, ids, mask)
    loaded = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    lsm = torch.log_softmax(loaded(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    close(logp, (lsm.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).detach(), "from_pretrained logp")
    assert AutoTokenizer.from_pretrained(hf_dir).encode("1+2") == tokenizer.encode("1+2")
    # ... and build_model(path=...) reads the sharded safetensors back (tied lm_head not stored)
    again = mu.build_model(path=hf_dir, init_config=None, dist=d, param_dtype=torch.float32,
                           reduce_dtype=torch.float32, activation_checkpointing=False, requires_grad=False)
    assert not again.training and not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        close(mu.sequence_logprobs(again, ids, mask), logp, "build_model(path) logp", atol=0)

    # --- a bf16 checkpoint is stored in bf16 (config.dtype), trained on as fp32 master weights
    bf16 = mu.build_model(path=None, init_config={**TINY, "dtype": "bfloat16"}, dist=d, param_dtype=torch.float32,
                          reduce_dtype=torch.float32, activation_checkpointing=False, seed=1)
    bf16_dir = os.path.join(tmp, "hf_bf16")
    mu.save_hf(bf16, tokenizer, bf16_dir, dist=d)
    stored = safetensors.torch.load_file(os.path.join(bf16_dir, "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(bf16_dir).dtype == torch.bfloat16
    back = mu.build_model(path=bf16_dir, init_config=None, dist=d, param_dtype=torch.float32,
                          reduce_dtype=torch.float32, activation_checkpointing=False)
    assert back.lm_head.weight.dtype == torch.float32
    for n, w in full_params(back).items():
        assert torch.equal(w, stored[n].float()), n


def check_state(d: dist_utils.Dist, tmp: str):
    model, opt, train_step = trained_tied_model(d)
    # --- save_state / load_state round trip: weights, optimizer state, RNG, extras
    ckpt = os.path.join(tmp, "ckpt")
    extra = {"step": 1, "sampler": {"epoch": 0, "cursor": 3 + d.rank}, "t": torch.arange(3) * (d.rank + 1)}
    for step in (1, 2):
        checkpoint.save_state(ckpt, step, model, opt, {**extra, "step": step}, dist=d, keep=2)
    saved_w = full_params(model)
    saved_opt = {k: v.full_tensor().clone() for k, v in opt.state[model.lm_head.weight].items()
                 if isinstance(v, torch.distributed.tensor.DTensor)}
    draws = (torch.rand(3), random.random(), np.random.rand())
    train_step()                                   # move weights, optimizer state and RNG on
    torch.rand(5), random.random(), np.random.rand()
    checkpoint.save_state(ckpt, 3, model, opt, {"step": 3}, dist=d, keep=2)
    assert sorted(os.listdir(ckpt)) == ["step-2", "step-3"], os.listdir(ckpt)
    got = checkpoint.load_state(os.path.join(ckpt, "step-2"), model, opt, dist=d)
    assert got["step"] == 2 and got["sampler"] == extra["sampler"] and torch.equal(got["t"], extra["t"]), got
    for n, w in full_params(model).items():
        assert torch.equal(w, saved_w[n]), f"weight {n} not restored"
    for k, v in opt.state[model.lm_head.weight].items():
        if k in saved_opt:
            assert torch.equal(v.full_tensor(), saved_opt[k]), f"optimizer {k} not restored"
    assert set(saved_opt) == {"exp_avg", "exp_avg_sq"}, saved_opt.keys()
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    assert_sharded(model)

    # --- resume into a fresh model + fresh optimizer (train.py's path): the next step is identical
    fresh = mu.build_model(path=None, init_config={**TINY, "tie_word_embeddings": True}, dist=d,
                           param_dtype=torch.float32, reduce_dtype=torch.float32, activation_checkpointing=True,
                           seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load_state(checkpoint.latest_state(ckpt), fresh, fresh_opt, dist=d)["step"] == 3
    checkpoint.load_state(os.path.join(ckpt, "step-2"), fresh, fresh_opt, dist=d)
    train_step()
    train_step(fresh, fresh_opt)
    theirs = full_params(fresh)
    for n, w in full_params(model).items():
        assert torch.equal(w, theirs[n]), f"resumed step differs at {n}"


def check_packed(d: dist_utils.Dist, tmp: str):
    """packed_logprobs (one padding-free row per rank) == sequence_logprobs of the same sequences padded, for
    values, entropy and gradients, with sdpa and eager attention; and attention stays inside each sequence:
    changing one packed sequence's tokens leaves every other sequence's log-probs bit-for-bit as they were."""
    import packing
    ids, mask = batch()
    rows = list(range(d.rank, B, d.world_size))
    lengths = [int(mask[r].sum()) for r in rows]
    width = max(lengths)
    for attn in ("sdpa", "eager"):
        model = mu.build_model(path=None, init_config={**TINY, "tie_word_embeddings": True}, dist=d,
                               param_dtype=torch.float32, reduce_dtype=torch.float32, activation_checkpointing=True,
                               seed=0, attn_implementation=attn)
        padded_ids, padded_mask = ids[rows, :width], mask[rows, :width]                # [b, width]
        lp, ent = mu.sequence_logprobs(model, padded_ids, padded_mask, temperature=TEMP, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        packed = packing.pack([ids[r, :n] for r, n in zip(rows, lengths)])
        assert packed["input_ids"].shape == (1, sum(lengths))  # no padding at all
        plp, pent = mu.packed_logprobs(model, packed, width, temperature=TEMP, return_entropy=True)
        assert plp.shape == lp.shape == (len(rows), width - 1)
        close(plp, lp, f"{attn}: packed logp")
        close(pent, ent, f"{attn}: packed entropy")
        (plp.sum() + pent.sum()).backward()
        for n, p in model.named_parameters():
            close(p.grad.full_tensor(), grads[n], f"{attn}: packed grad {n}", atol=1e-4)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # one sequence changed (the first): the others' log-probs do not move at all
            base = mu.packed_logprobs(model, packed, width)
            changed = [ids[r, :n].clone() for r, n in zip(rows, lengths)]
            changed[0] = (changed[0] + 7) % TINY["vocab_size"]
            other = mu.packed_logprobs(model, packing.pack(changed), width)
        assert not torch.equal(other[0], base[0]), f"{attn}: the changed sequence's log-probs did not change"
        assert torch.equal(other[1:], base[1:]), f"{attn}: attention crossed into another packed sequence"
        assert_sharded(model)


if __name__ == "__main__":
    check, tmp = sys.argv[1], sys.argv[2]
    dist = dist_utils.setup_distributed()
    {"logprobs": check_logprobs, "hf": check_hf, "state": check_state, "packed": check_packed}[check](dist, tmp)
    dist_utils.print0(f"OK {check} world={dist.world_size}")
    dist_utils.teardown_distributed()
