"""DPO on teacher pairs (loss.dpo_pairs, loss.dpo_pair_loss, dpo.py's two-pass step) against independent references:
a hand-computed case, a naive full-batch autograd implementation on a tiny model (in process), and train.py end to
end with real torchrun processes (gloo): micro_batch_size 1 == 16, packed == padded, 1 rank == 2 ranks, resume."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402
import loss as L  # noqa: E402
import train  # noqa: E402  (config dataclasses only)

TINY_MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


# --- the pure functions ----------------------------------------------------------------------------------------

def test_dpo_pair_loss_hand_computed():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> z = 1; l = log(1 + e^-1)
    # second pair: margin = (-4 - -3) - (-2 - -2) = -1; beta 0.5 -> z = -0.5; l = log(1 + e^0.5)
    out = L.dpo_pair_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -3.0]),
                          torch.tensor([-2.0, -2.0]), beta=0.5)
    torch.testing.assert_close(out, torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(0.5))]))
    # a huge margin: finite, ~0 (and ~|z| on the wrong side), no overflow
    big = L.dpo_pair_loss(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    torch.testing.assert_close(big, torch.tensor([0.0, 1e4]))


def test_dpo_pairs_every_positive_negative_pair_inside_each_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0,  1.0, 1.0, 1.0, 1.0,  0.0, 1.0, 0.0, 0.0])
    chosen, rejected = L.dpo_pairs(rewards, 4)
    expected = [(0, 1), (0, 3), (2, 1), (2, 3), (9, 8), (9, 10), (9, 11)]  # the all-positive group gives none
    assert list(zip(chosen.tolist(), rejected.tolist())) == expected
    c, r = L.dpo_pairs(torch.zeros(4), 4)
    assert c.numel() == r.numel() == 0
    with pytest.raises(ValueError):
        L.dpo_pairs(torch.ones(6), 4)


# --- one step in process against a naive full-batch autograd implementation ------------------------------------

@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-process gloo group (dpo.backward all-reduces its counts)."""
    path = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


def tiny_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_MODEL)).float()
    ref = Qwen2ForCausalLM(Qwen2Config(**TINY_MODEL)).float()  # another init: the reference differs from the policy
    ref.requires_grad_(False)
    ref.reshard = lambda: None  # (an FSDP2 module's method; dpo.backward calls it after the reference's forwards)
    return model, ref


def plain_logprobs(model, batch):
    """logp [b, t] of a padded batch by a plain forward (no FSDP, no fused kernel): the naive path."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits[:, :-1]
    return logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * am[:, 1:]


def make_items(G=4, seed=0):
    """Three groups: mixed, all-positive (pairless), one positive; prompts of 3 tokens, responses of 2-9."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for rewards in ([1.0, 0.0, 1.0, 0.0], [1.0] * G, [0.0, 1.0, 0.0, 0.0]):
        ids, masks = [], []
        for _ in range(G):
            n = int(torch.randint(2, 10, (1,), generator=g))
            ids.append(torch.randint(0, 128, (3 + n,), generator=g).tolist())
            masks.append([0] * 3 + [1] * n)
        items.append({"input_ids": ids, "loss_mask": masks, "rewards": rewards})
    return items


def naive_dpo(model, ref, items, *, beta, norm, nll_coef):
    """Every row in one forward, pairs by Python loops, the mean over pairs: loss (backward done)."""
    import data
    full = data.collate(items, 0)
    mask = full["loss_mask"][:, 1:]
    S = (plain_logprobs(model, full) * mask).sum(-1)
    with torch.no_grad():
        S_ref = (plain_logprobs(ref, full) * mask).sum(-1)
    n = mask.sum(-1)
    x, x_ref = (S / n, S_ref / n) if norm == "mean" else (S, S_ref)
    terms = []
    for q, it in enumerate(items):
        for a, ra in enumerate(it["rewards"]):
            for b, rb in enumerate(it["rewards"]):
                if ra > 0 and rb <= 0:
                    w, l = q * 4 + a, q * 4 + b
                    z = beta * ((x[w] - x_ref[w]) - (x[l] - x_ref[l]))
                    terms.append(-torch.log(torch.sigmoid(z)) + nll_coef * (-S[w] / n[w]))
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("norm, nll_coef, mbs", [("sum", 0.0, 1), ("sum", 0.0, 16), ("mean", 0.5, 3)])
def test_dpo_step_equals_naive_full_batch_autograd(one_rank_group, norm, nll_coef, mbs):
    model, ref = tiny_models()
    items = make_items()
    beta = 0.7  # large enough that the margins' sigmoids differ from 1/2
    cfg = train.Config()
    cfg.loss = train.LossConfig(name="dpo", kl_coef=0.0, dpo_beta=beta, dpo_norm=norm, dpo_nll_coef=nll_coef)
    cfg.data.group_size, cfg.train.micro_batch_size = 4, mbs
    want = naive_dpo(model, ref, items, beta=beta, norm=norm, nll_coef=nll_coef)
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert sum(float(g.norm()) for g in want_grads.values()) > 1e-3  # (a real gradient to compare)
    model.zero_grad(set_to_none=True)
    row = dpo.backward(cfg, one_rank_group, model, ref, None, items, [0, 1, 2], 0, plain_logprobs)
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert row["data/pairs"] == 7 and row["data/pairless_share"] == pytest.approx(1 / 3)
    # rows of the pairless group were not run: 8 paired rows, in ceil(8 / mbs) micro-batches
    assert row["perf/micro_batches"] == math.ceil(8 / mbs)
    assert row["tokens"] == sum(sum(m) for it in items[:1] + items[2:] for m in it["loss_mask"])


def test_dpo_refuses_the_k3_term_and_bad_keys(tmp_path):
    for override, message in [("loss.kl_coef=0.1", "loss.name=dpo: loss.dpo_beta is its KL strength"),
                              ("loss.dpo_norm=max", "loss.dpo_norm must be sum or mean, got 'max'"),
                              ("loss.dpo_beta=0", "loss.dpo_beta must be > 0")]:
        with pytest.raises(train.ConfigError, match=message.replace(".", r"\.")):
            train.load_config(os.path.join(ROOT, "configs/tiny/dpo.yaml"), [override], check_paths=False)


# --- train.py end to end (real torchrun processes) -------------------------------------------------------------

def make_lab_data(root):
    data_dir = root / "data"
    subprocess.run([sys.executable, "synthetic.py", "--out", str(data_dir), "--n-mid", "64", "--n-teacher", "12",
                    "--n-eval", "4"], cwd=ROOT, check=True, env=ENV, capture_output=True)
    subprocess.run([sys.executable, "curate.py", "--input", str(data_dir / "teacher_raw.jsonl"),
                    "--output", str(data_dir / "teacher.jsonl"), "--min-agreement", "0.0"],
                   cwd=ROOT, check=True, env=ENV, capture_output=True)
    return data_dir


def run_train(out, cfg, *, nproc, extra=()):
    out = os.fspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    path = out + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump({**cfg, "output_dir": out}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", path, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return __import__("pathlib").Path(out)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a, b, atol):
    import glob
    from safetensors.torch import load_file

    def load(d):
        state = {}
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            state.update(load_file(f))
        return state
    wa, wb = load(a), load(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Synthetic data (mid + curated teacher) and a tiny base model exported by a 1-step SFT run."""
    root = tmp_path_factory.mktemp("dpolab")
    data_dir = make_lab_data(root)
    base = {"model": {"init_config": TINY_MODEL, "tokenizer": str(data_dir / "tokenizer"),
                      "activation_checkpointing": False},
            "data": {"train_path": str(data_dir / "mid.jsonl"), "group_size": 1, "max_len": 256},
            "loss": {"name": "sft"}, "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"questions_per_step": 8, "micro_batch_size": 8, "max_steps": 1, "save_every": 100}}
    out = run_train(root / "base", base, nproc=1)
    return {"root": root, "data": data_dir, "base": str(out / "hf" / "final")}


def dpo_config(lab, **train_kw):
    return {"model": {"path": lab["base"], "activation_checkpointing": True},
            "data": {"train_path": str(lab["data"] / "teacher.jsonl"), "group_size": 8, "max_len": 512},
            "loss": {"name": "dpo", "kl_coef": 0.0, "dpo_beta": 0.5, "ref_logprobs": "cached"},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"questions_per_step": 4, "micro_batch_size": 4, "max_steps": 4, "save_every": 100, **train_kw}}


def same_run(a, b, rel=1e-5, atol=1e-5):
    ma, mb = metrics(a), metrics(b)
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], rel=rel, abs=1e-7)
    assert [m["grad_norm"] for m in ma] == pytest.approx([m["grad_norm"] for m in mb], rel=rel)
    assert_same_weights(a / "hf" / "final", b / "hf" / "final", atol=atol)


def test_dpo_train_invariant_to_micro_batches_packing_and_ranks(lab):
    """The two-pass step's loss and gradient do not depend on how a group is split: micro_batch_size 1 == 16,
    packed == padded, 1 rank == 2 ranks (a group's pairs on one rank, N_pairs over both)."""
    r = lab["root"]
    ref = run_train(r / "mbs16", dpo_config(lab, micro_batch_size=16), nproc=1)
    m = metrics(ref)
    assert len(m) == 4 and m[0]["data/pairs"] > 0
    assert m[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # step 1: the policy is the reference, margin 0
    assert m[0]["policy/dpo_margin"] == pytest.approx(0, abs=1e-6)
    for x in m:  # a step without pairs (every group all-positive or all-negative) is a zero step, not an error
        assert math.isfinite(x["loss"]) and (x["grad_norm"] > 0) == (x["data/pairs"] > 0) and 0 <= x["data/pairless_share"] <= 1
        assert x["data/pairs"] > 0 or x["loss"] == 0
    assert any(x["policy/dpo_margin"] != 0 for x in m[1:])  # the policy moved off the reference
    one = run_train(r / "mbs1", dpo_config(lab, micro_batch_size=1), nproc=1)
    same_run(ref, one)
    packed = run_train(r / "packed", dpo_config(lab), nproc=1, extra=["train.micro_batch_tokens=400"])
    same_run(ref, packed)
    # packed: several rows per forward (mbs 1: one per paired row)
    assert all(p["perf/micro_batches"] < o["perf/micro_batches"] for p, o in zip(metrics(packed), metrics(one)))
    same_run(ref, run_train(r / "two", dpo_config(lab, micro_batch_size=3), nproc=2))
    live = dpo_config(lab)
    live["loss"] = {**live["loss"], "ref_logprobs": "live"}
    same_run(ref, run_train(r / "live", live, nproc=2))


def test_dpo_resume_gives_the_uninterrupted_run(lab):
    cfg = dpo_config(lab, max_steps=4, save_every=1)
    cfg["loss"] = {**cfg["loss"], "dpo_norm": "mean", "dpo_nll_coef": 0.1}
    full = run_train(lab["root"] / "full", cfg, nproc=2)
    part = lab["root"] / "part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=2"])
    run_train(part, cfg, nproc=2, extra=["train.resume=auto"])
    assert [m["step"] for m in metrics(part)] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]  # exact
    assert_same_weights(full / "hf" / "final", part / "hf" / "final", atol=0)
