"""Rejection-sampling fine-tuning (loss.name=rft): SFT on the policy's own correct samples. In process: the step's
gradient is a naive SFT gradient over the correct rows alone (the wrong ones could be anything); end to end with
real torchrun processes: rollouts graded by reward.score, micro_batch_size 1 == 16 on 2 ranks, resume exact."""
import json
import math
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model_utils as mu  # noqa: E402
import train  # noqa: E402
from test_dpo import TINY_MODEL, assert_same_weights, make_items, make_lab_data, metrics, run_train  # noqa: E402


@pytest.fixture(scope="module")
def one_rank():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        yield types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
        dist.destroy_process_group()


def plain_model():
    """A tiny Qwen2 with train.logprobs' entry point bound as a plain method (no FSDP)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_MODEL)).float()
    model.sequence_logprobs = types.MethodType(mu._sequence_logprobs, model)
    model.reshard = lambda: None
    return model


def naive_sft_on_correct(model, items):
    """mean over the correct rows of the token-mean NLL, rows one by one (backward done) -> loss."""
    terms = []
    for it in items:
        for ids, m, r in zip(it["input_ids"], it["loss_mask"], it["rewards"]):
            if r > 0:
                x = torch.tensor(ids)[None]
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
                lp = logits.log_softmax(-1).gather(-1, x[0, 1:, None]).squeeze(-1)
                mask = torch.tensor(m[1:], dtype=torch.float32)
                terms.append(-(lp * mask).sum() / mask.sum())
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.item()


def rft_step(one_rank, model, items, mbs):
    cfg = train.Config()
    cfg.loss = train.LossConfig(name="rft", kl_coef=0.0)
    cfg.data.group_size, cfg.train.micro_batch_size = 4, mbs
    cfg.model.logprob_backend = "torch"
    model.zero_grad(set_to_none=True)
    row = train.grpo_backward(cfg, one_rank, model, None, None, items, [0, 1, 2], 0)
    return row, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_rft_trains_only_on_correct_own_samples(one_rank):
    model = plain_model()
    items = make_items()
    items[0]["rewards"] = [0.0] * 4  # a question without a correct sample: contributes nothing
    want = naive_sft_on_correct(model, items)
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    row, grads = rft_step(one_rank, model, items, mbs=3)
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert row["data/kept_share"] == pytest.approx(2 / 3)
    assert row["tokens"] == sum(sum(m[1:]) for it in items for m, r in zip(it["loss_mask"], it["rewards"]) if r > 0)
    # the wrong samples' tokens do not matter at all
    wrong = [dict(it, input_ids=[[(t * 7 + 3) % 128 for t in ids] if r <= 0 else ids
                                 for ids, r in zip(it["input_ids"], it["rewards"])]) for it in items]
    _, grads2 = rft_step(one_rank, model, wrong, mbs=1)
    for k in grads:
        torch.testing.assert_close(grads2[k], grads[k], rtol=1e-5, atol=1e-7, msg=k)


# --- train.py end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Synthetic data and a tiny base that has seen the teacher traces often enough that some of its own samples
    are correct (a 1-step base never writes \\boxed{}: RFT would have nothing to train on)."""
    root = tmp_path_factory.mktemp("rftlab")
    data_dir = make_lab_data(root)
    base = {"model": {"init_config": TINY_MODEL, "tokenizer": str(data_dir / "tokenizer"),
                      "activation_checkpointing": False},
            "data": {"train_path": str(data_dir / "teacher.jsonl"), "group_size": 8, "max_len": 256},
            "loss": {"name": "sft"}, "optim": {"lr": 1e-2, "warmup_steps": 2},
            "train": {"questions_per_step": 4, "micro_batch_size": 32, "max_steps": 40, "save_every": 100}}
    out = run_train(root / "base", base, nproc=1)
    return {"root": root, "data": data_dir, "base": str(out / "hf" / "final")}


def rft_config(lab, **train_kw):
    return {"model": {"path": lab["base"], "activation_checkpointing": False},
            "data": {"train_path": str(lab["data"] / "teacher.jsonl"), "group_size": 4, "max_len": 512},
            "loss": {"name": "rft", "kl_coef": 0.1, "ref_logprobs": "live"},
            "rollout": {"temperature": 1.0, "max_new_tokens": 80},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"questions_per_step": 4, "micro_batch_size": 16, "max_steps": 3, "save_every": 1, **train_kw}}


def test_rft_micro_batches_and_resume(lab):
    r = lab["root"]
    full = run_train(r / "mbs16", rft_config(lab), nproc=2)
    m = metrics(full)
    assert len(m) == 3 and any(x["data/kept_share"] > 0 for x in m), m  # some own samples were correct
    for x in m:
        assert 0 <= x["data/kept_share"] <= 1 and 0 <= x["data/reward_mean"] <= 1 and math.isfinite(x["loss"])
        assert (x["tokens"] > 0) == (x["data/reward_mean"] > 0)  # trained tokens: the correct samples' only
    one = run_train(r / "mbs1", rft_config(lab, micro_batch_size=1), nproc=2)
    m1 = metrics(one)
    assert [x["loss"] for x in m1] == pytest.approx([x["loss"] for x in m], rel=1e-5, abs=1e-7)
    assert [x["data/reward_mean"] for x in m1] == [x["data/reward_mean"] for x in m]  # the same rollouts
    assert_same_weights(full / "hf" / "final", one / "hf" / "final", atol=1e-5)
    part = r / "part"
    run_train(part, rft_config(lab), nproc=2, extra=["train.stop_after=2"])
    run_train(part, rft_config(lab), nproc=2, extra=["train.resume=auto"])
    assert [x["loss"] for x in metrics(part)] == [x["loss"] for x in m]  # exact
    assert_same_weights(full / "hf" / "final", part / "hf" / "final", atol=0)
