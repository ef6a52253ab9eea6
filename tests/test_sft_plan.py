"""SFT leaves reward-0 rows out of its micro-batches and of the reference pre-pass: the step's loss and gradients
equal a naive full-batch reference in which every row is present and the negatives are masked (the old path),
with ranks holding different numbers of positives (one none at all); end to end, the cached reference holds
only positive responses and the losses do not depend on world size, micro-batch size or packing."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_train import ENV, grpo_config, lab, metrics, run_train  # noqa: E402,F401

STEP_CHECK = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
import dist_utils, train
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
G, PROMPT = 4, 3
REWARDS = [[[1, 0, 1, 0], [0, 0, 0, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]]]  # rank 0: 3 positives; rank 1: none
mbs, tokens, result = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
d = dist_utils.setup_distributed()
g = torch.Generator().manual_seed(5)
def item(rewards):
    seqs = [torch.randint(3, 64, (int(torch.randint(PROMPT + 2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(G)]
    return {"input_ids": seqs, "loss_mask": [[0] * PROMPT + [1] * (len(s) - PROMPT) for s in seqs],
            "rewards": [float(r) for r in rewards]}
items = [[item(r) for r in rank] for rank in REWARDS]  # the same on every rank (one generator)
cfg = train.Config(output_dir="unused")
cfg.loss.name, cfg.data.group_size = "sft", G
cfg.train.micro_batch_size, cfg.train.micro_batch_tokens = mbs, tokens
cfg.optim.grad_clip = 1e9  # (the spy reads the gradients after the clip)
model, ref_model, opt = train.build_models(cfg, d)  # (init_config below)
'''


STEP_CHECK_TAIL = r'''
grads = {}
step = opt.step
def spy(*a, **k):  # the step's summed gradients, before AdamW (lr 0: nothing moves)
    for n, p in model.named_parameters():
        grads[n.replace("_checkpoint_wrapped_module.", "")] = p.grad.full_tensor().clone()
    return step(*a, **k)
opt.step = spy
row = train.train_step(cfg, d, model, None, None, opt, items[d.rank], [d.rank * 2, d.rank * 2 + 1], 0.0, 0)
torch.manual_seed(0)
naive = AutoModelForCausalLM.from_config(Qwen2Config(**TINY), dtype=torch.float32)
loss, n_pos = 0.0, sum(r > 0 for rank in REWARDS for q in rank for r in q)
for rank in items:  # every row of the step, negatives included but masked: the old path's loss
    for it in rank:
        for ids, m, r in zip(it["input_ids"], it["loss_mask"], it["rewards"]):
            x = torch.tensor([ids])
            lsm = torch.log_softmax(naive(input_ids=x).logits[0, :-1].float(), -1)   # [t, V]
            logp = lsm.gather(-1, x[0, 1:, None])[:, 0]                           # [t]
            mask = torch.tensor(m[1:], dtype=torch.float32) * float(r > 0)         # [t]
            loss = loss + (-(logp * mask).sum() / mask.sum().clamp(min=1)) / n_pos
loss.backward()
err = max((grads[n] - p.grad).abs().max().item() for n, p in naive.named_parameters())
if d.rank == 0:
    json.dump({"loss": row["loss"], "naive": loss.item(), "grad_err": err, "grad_max": max(
        p.grad.abs().max().item() for p in naive.parameters()), "micro_batches": row["perf/micro_batches"]},
        open(result, "w"))
dist_utils.teardown_distributed()
'''


@pytest.mark.parametrize("mbs, tokens, forwards", [(1, 0, 3), (2, 0, 2), (1, 24, None)])
def test_sft_step_without_negatives_equals_the_masked_full_batch(tmp_path, mbs, tokens, forwards):
    """Rank 0 holds 3 positives of 8 rows, rank 1 none: each runs as many forwards as rank 0's positives need
    (rank 1 placeholders of weight 0) instead of 8 / mbs, and loss and gradients are the naive full batch's."""
    script = tmp_path / "check.py"
    script.write_text(STEP_CHECK.replace("cfg = train.Config(", "cfg = train.Config(model=train.ModelConfig("
                                         "init_config=TINY, activation_checkpointing=False), ")
                      + STEP_CHECK_TAIL)
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(mbs), str(tokens), str(result)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(result.read_text())
    assert res["loss"] == pytest.approx(res["naive"], rel=1e-5)
    assert res["grad_err"] <= 1e-5 * res["grad_max"] + 1e-7, res
    if forwards is not None:
        assert res["micro_batches"] == forwards  # the old path: 8 rows / mbs on each rank


def test_sft_cached_reference_holds_positives_only_and_losses_are_invariant(lab):
    """SFT with a cached reference (KL 0.1) on teacher groups with negatives: the pre-pass writes exactly the
    positive responses, and 1 rank x 4 rows, 2 ranks x 1 row and 2 ranks packed give the same losses."""
    cfg = grpo_config(lab, "x", loss={"name": "sft", "kl_coef": 0.1, "ref_logprobs": "cached",
                                      "all_positive_bias": 0.0}, max_steps=3)
    one = run_train(lab["root"] / "sft1", cfg, nproc=1)
    two = run_train(lab["root"] / "sft2", cfg, nproc=2, extra=["train.micro_batch_size=1"])
    packed = run_train(lab["root"] / "sft2p", cfg, nproc=2, extra=["train.micro_batch_tokens=400"])
    ref = [m["loss"] for m in metrics(one)]
    assert metrics(one)[-1]["policy/kl_mean"] > 0
    for run in (two, packed):
        assert [m["loss"] for m in metrics(run)] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    import data
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(lab["base"])
    ds = data.GroupDataset(data.read_records(str(lab["data"] / "teacher.jsonl")), tokenizer, group_size=4,
                           max_len=512, overlong="truncate")
    positives = {f"q{qi}.{j}" for qi in range(len(ds)) for j, r in enumerate(ds[qi]["rewards"]) if r > 0}
    assert 0 < len(positives) < 4 * len(ds)  # the lab's teacher groups have negatives
    import reference
    for run in (one, two, packed):
        assert set(reference.RefCache(str(run / "ref_logprobs"), 1 if run == one else 2).where) == positives
        assert json.loads((run / "ref_logprobs" / "fingerprint.json").read_text())["responses"] == "reward > 0"
