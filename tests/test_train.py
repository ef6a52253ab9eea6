"""train.py end to end with real torchrun processes on CPU (gloo): world-size and micro-batch invariance,
exact resume, HF export, cached vs live reference log-probs, config errors. Tiny model, tiny data."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402  (config loading only; nothing heavy at import)

TINY_MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def make_lab_data(root):
    """Tiny synthetic data under root/data: mid.jsonl, teacher_raw.jsonl curated to teacher.jsonl, tokenizer/."""
    data_dir = root / "data"
    subprocess.run([sys.executable, "synthetic.py", "--out", str(data_dir), "--n-mid", "64", "--n-teacher", "12",
                    "--n-eval", "4"], cwd=ROOT, check=True, env=ENV, capture_output=True)
    subprocess.run([sys.executable, "curate.py", "--input", str(data_dir / "teacher_raw.jsonl"),
                    "--output", str(data_dir / "teacher.jsonl"), "--min-agreement", "0.0"],
                   cwd=ROOT, check=True, env=ENV, capture_output=True)
    return data_dir


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Synthetic data (mid + curated teacher) and a tiny base model exported by a 1-step SFT run."""
    root = tmp_path_factory.mktemp("lab")
    data_dir = make_lab_data(root)
    base = run_train(root / "base", base_config(root, data_dir, max_steps=1), nproc=1)
    return {"root": root, "data": data_dir, "base": str(base / "hf" / "final")}


def base_config(root, data_dir, **train_kw):
    return {"output_dir": str(root / "base"),
            "model": {"init_config": TINY_MODEL, "tokenizer": str(data_dir / "tokenizer"),
                      "activation_checkpointing": False},
            "data": {"train_path": str(data_dir / "mid.jsonl"), "group_size": 1, "max_len": 256},
            "loss": {"name": "sft"},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"questions_per_step": 8, "micro_batch_size": 8, "save_every": 100, **train_kw}}


def grpo_config(lab, out, *, loss=None, **train_kw):
    return {"output_dir": str(out),
            "model": {"path": lab["base"], "activation_checkpointing": True},
            "data": {"train_path": str(lab["data"] / "teacher.jsonl"), "group_size": 4, "max_len": 512},
            "loss": {"name": "offgrpo", "all_positive_bias": 0.5, "kl_coef": 0.1, "ref_logprobs": "live",
                     **(loss or {})},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "train": {"questions_per_step": 4, "micro_batch_size": 4, "max_steps": 3, "save_every": 100,
                      **train_kw}}


def run_train(out, cfg, *, nproc, extra=(), check=True):
    out = os.fspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cfg = {**cfg, "output_dir": out}
    path = out + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", path, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    with open(out + ".log", "w") as f:  # (the last run's stdout, for tests that read the log)
        f.write(proc.stdout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return __import__("pathlib").Path(out)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(hf_dir):
    from safetensors.torch import load_file
    state = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        state.update(load_file(f))
    return state


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_every_config_loads():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) >= 10
    for p in paths:
        cfg = train.load_config(p, [], check_paths=False)
        assert cfg.output_dir and cfg.loss.name in ("sft", "offgrpo", "onpolicy", "dpo", "rft")
        with open(p) as f:
            assert f.readline().startswith("#")  # a header ...
            assert "train.py " + os.path.relpath(p, ROOT) in f.read()  # ... with the exact launch command


def test_blog_and_released_configs_differ_as_documented():
    blog = train.load_config(os.path.join(ROOT, "configs/bias05.yaml"), [], check_paths=False)
    code = train.load_config(os.path.join(ROOT, "configs/krafton_code.yaml"), [], check_paths=False)
    assert (blog.optim.lr, blog.train.questions_per_step, blog.data.group_size, blog.train.epochs) == (1e-7, 32, 8, 3)
    assert (blog.loss.kl_coef, blog.loss.all_positive_bias, blog.loss.scale_by_std) == (0.1, 0.5, True)
    assert (code.loss.kl_coef, code.train.epochs, code.loss.clip_eps, code.loss.scale_by_std) == (0.2, 5, None, False)
    assert (code.loss.entropy_coef, code.loss.all_positive_bias) == (0.001, 0.1)


@pytest.mark.parametrize("override, message", [
    ("loss.kll_coef=0.1", "unknown key 'loss.kll_coef'; valid keys in loss: name, clip_eps"),
    ("loss.kl_coef=abc", "loss.kl_coef: expected float, got 'abc'"),
    ("train.max_steps=2.5", "train.max_steps: expected int, got 2.5"),
    ("data.train_path=/nonexistent.jsonl", "data.train_path not found"),
    ("loss.name=ppo", "loss.name must be sft, offgrpo, onpolicy, dpo or rft"),
    ("model.path=/tmp", "set exactly one of model.path and model.init_config"),
    ("model.tokenizer=/nonexistent", "model.tokenizer not found"),
    ("loss.luffy_gamma=0.1", "loss.luffy_gamma replaces the clip"),
    ("train.loggers=[jsonl,tensorbord]", "train.loggers: unknown 'tensorbord'; valid: jsonl, tensorboard, wandb"),
    ("train.wandb_mode=offlne", "train.wandb_mode must be one of online, offline, disabled"),
    ("rollout.backend=sglang", "rollout.backend must be hf, vllm or auto, got 'sglang'"),
    ("rollout.backend=vllm", "rollout.backend=vllm starts its engine from model.path"),
])
def test_bad_config_is_one_line_without_traceback(tmp_path, override, message):
    out = tmp_path / "run"
    cfg = {"output_dir": str(out), "model": {"init_config": TINY_MODEL, "tokenizer": str(tmp_path)},
           "data": {"train_path": __file__}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "train.py", str(path), override], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not out.exists()


def test_model_path_without_weights_and_incompatible_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path)}, "data": {"train_path": __file__}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for override, message in [("loss.name=sft", f"model.path has no safetensors weights: {tmp_path}"),
                              ("rollout.backend=vllm", "rollout.backend=vllm needs the vllm package"),  # (not here)
                              ("loss.name=onpolicy loss.kl_coef=0.1 loss.ref_logprobs=cached",
                               "loss.ref_logprobs=cached needs fixed responses")]:
        proc = subprocess.run([sys.executable, "train.py", str(path), *override.split()], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()


def test_runtime_input_errors_are_one_line_from_rank_0(lab, tmp_path):
    """Checks that need the run (the data read, the world size) or the machine: one `config error:` / `data
    error:` line from rank 0 only, exit 2 from every rank (torchrun adds its own failure summary), no traceback
    from train.py, nothing written but the resolved config.yaml."""
    cfg = grpo_config(lab, "x")
    cases = [(["data.group_size=64"], "data error: ", "data.group_size=64 but the most responses any question has is 8"),
             (["train.questions_per_step=3"], "config error: ", "train.questions_per_step=3 must be divisible by "
                                                                "world size 2")]
    for i, (extra, kind, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        path = tmp_path / f"run{i}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "train.py", str(path), *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        ours = [line for line in proc.stderr.splitlines() if line.startswith(("config error:", "data error:"))]
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-2000:]
        assert ours == [ours[0]] and ours[0].startswith(kind) and message in ours[0], proc.stderr[-2000:]
        assert 'train.py", line' not in proc.stderr  # torchrun's own summary is the only traceback
        assert sorted(os.listdir(out)) == ["config.yaml"]
    # the Triton backend on a machine without a GPU and without the interpreter: refused before anything runs
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "triton"
    path = tmp_path / "triton.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    proc = subprocess.run([sys.executable, "train.py", str(path), "model.logprob_backend=triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "config error: model.logprob_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1, the interpreter); "
        "use auto or torch"], proc.stderr
    assert not out.exists()


def test_base_sft_same_losses_on_1_and_2_ranks(lab):
    cfg = base_config(lab["root"], lab["data"], max_steps=3)
    one = run_train(lab["root"] / "sft1", cfg, nproc=1)
    two = run_train(lab["root"] / "sft2", cfg, nproc=2)
    kept = run_train(lab["root"] / "sft2_kept", cfg, nproc=2, extra=["model.reshard_after_forward=false"])
    whole = run_train(lab["root"] / "sft2_whole", cfg, nproc=2, extra=["model.shard_layers=false"])
    l1, l2 = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert len(l1) == 3 and l1[0] > 0
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert_same_weights(one / "hf" / "final", two / "hf" / "final", atol=1e-5)
    # layers kept gathered from forward to backward: the same computation, fewer all-gathers
    assert [m["loss"] for m in metrics(kept)] == l2
    assert_same_weights(two / "hf" / "final", kept / "hf" / "final", atol=0)
    # the whole model as one FSDP unit: the same sums, in one all-gather and one reduce-scatter
    assert [m["loss"] for m in metrics(whole)] == pytest.approx(l2, rel=1e-6)
    assert_same_weights(two / "hf" / "final", whole / "hf" / "final", atol=1e-6)


def test_bias05_same_losses_on_1_and_2_ranks_and_micro_batches(lab):
    one = run_train(lab["root"] / "b1", grpo_config(lab, "x"), nproc=1)
    two = run_train(lab["root"] / "b2", grpo_config(lab, "x", micro_batch_size=3), nproc=2)
    m1, m2 = metrics(one), metrics(two)
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-5, abs=1e-7)
    assert [m["grad_norm"] for m in m1] == pytest.approx([m["grad_norm"] for m in m2], rel=1e-5)
    assert m1[-1]["policy/kl_mean"] > 0  # the policy moved away from the reference
    assert_same_weights(one / "hf" / "final", two / "hf" / "final", atol=1e-5)


def test_packed_micro_batches_same_as_padded(lab):
    """train.micro_batch_tokens (whole sequences packed into padding-free rows, position_ids restarting per
    sequence) gives the padded run's per-step losses (<= 1e-5 relative) and final weights, on 1 and 2 ranks, for
    SFT and for off-policy GRPO with the cached reference (whose pre-pass is packed too)."""
    sft = base_config(lab["root"], lab["data"], max_steps=3)
    grpo = grpo_config(lab, "x", loss={"ref_logprobs": "cached"})
    for name, cfg, budget in (("sft", sft, 300), ("grpo", grpo, 400)):
        padded = run_train(lab["root"] / f"pack-{name}-padded", cfg, nproc=1)
        mp = metrics(padded)
        for nproc in (1, 2):
            packed = run_train(lab["root"] / f"pack-{name}-{nproc}", cfg, nproc=nproc,
                               extra=[f"train.micro_batch_tokens={budget}"])
            mk = metrics(packed)
            assert [m["loss"] for m in mk] == pytest.approx([m["loss"] for m in mp], rel=1e-5, abs=1e-7)
            assert [m["grad_norm"] for m in mk] == pytest.approx([m["grad_norm"] for m in mp], rel=1e-5)
            assert_same_weights(padded / "hf" / "final", packed / "hf" / "final", atol=1e-5)
            # really packed: fewer forwards than the padded run's rows per rank, several sequences per row
            rows_per_rank = cfg["train"]["questions_per_step"] * cfg["data"]["group_size"] // nproc
            assert all(m["perf/micro_batches"] < rows_per_rank for m in mk), [m["perf/micro_batches"] for m in mk]
        if name == "grpo":
            assert mp[-1]["policy/kl_mean"] > 0 and os.path.exists(packed / "ref_logprobs" / "COMPLETE")


@pytest.mark.parametrize("agg", [{"agg": "token-mean", "kl_clamp": 0.01},
                                 {"agg": "seq-mean-token-sum-norm", "agg_len": 300}])
def test_other_aggregations_same_losses_on_1_and_2_ranks_and_micro_batches(lab, agg):
    """token-mean (DAPO) and seq-mean-token-sum-norm (Dr.GRPO) normalise by global counts too: the step's loss
    and gradient do not depend on world size or micro-batch size; and they are other losses than eq. 6's."""
    one = run_train(lab["root"] / f"agg1-{agg['agg']}", grpo_config(lab, "x", loss=agg), nproc=1)
    two = run_train(lab["root"] / f"agg2-{agg['agg']}", grpo_config(lab, "x", loss=agg, micro_batch_size=3), nproc=2)
    m1, m2 = metrics(one), metrics(two)
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-5, abs=1e-7)
    assert [m["grad_norm"] for m in m1] == pytest.approx([m["grad_norm"] for m in m2], rel=1e-5)
    assert_same_weights(one / "hf" / "final", two / "hf" / "final", atol=1e-5)
    default = metrics(run_train(lab["root"] / "agg-default", grpo_config(lab, "x"), nproc=1))
    # (the tiny lab's responses of one question are often equally long, where token-mean equals eq. 6: the clamp
    # then makes the difference from step 2 on)
    assert [m["grad_norm"] for m in m1] != pytest.approx([m["grad_norm"] for m in default], rel=1e-3)


def test_resume_gives_the_losses_of_the_uninterrupted_run(lab):
    cfg = grpo_config(lab, "x", max_steps=5, save_every=1)
    full = run_train(lab["root"] / "full", cfg, nproc=2)
    part = lab["root"] / "part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=3"])
    assert [m["step"] for m in metrics(part)] == [1, 2, 3]
    assert not (part / "hf" / "final").exists()
    run_train(part, cfg, nproc=2, extra=["train.resume=auto"])
    assert [m["step"] for m in metrics(part)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]  # exact
    assert "data: token copy reused" in open(f"{part}.log").read()  # the restart did not tokenise again
    assert_same_weights(full / "hf" / "final", part / "hf" / "final", atol=0)


def test_a_resume_does_not_read_the_base_weights(lab, tmp_path):
    """The checkpoint overwrites every parameter, so a resumed policy is built without reading model.path's
    weights (15 GB at 7B): with them made unreadable after the first part, the resumed run still equals the
    uninterrupted one exactly (issue 26.7). No reference model (kl_coef 0), which would read them."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(lab["base"], base)
    cfg = grpo_config(lab, "x", loss={"kl_coef": 0.0}, max_steps=4, save_every=1)
    cfg["model"]["path"] = str(base)
    full = run_train(tmp_path / "full", cfg, nproc=2)
    part = tmp_path / "part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=2"])
    for f in base.glob("*.safetensors"):
        f.write_bytes(b"")  # unreadable: a read would fail
    run_train(part, cfg, nproc=2, extra=["train.resume=auto"])
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]
    assert_same_weights(full / "hf" / "final", part / "hf" / "final", atol=0)


def test_a_copied_model_is_the_same_model_for_the_cached_reference(lab, tmp_path):
    """The reference cache keys the model by its contents (config.json, weight names, sizes, sampled blocks), not
    its path or mtimes: resumed with model.path pointing at a fresh copy of the base, the run continues and equals
    the uninterrupted one (issue 26.7); the same copy with other weights would be refused."""
    import shutil
    cfg = grpo_config(lab, "x", loss={"ref_logprobs": "cached"}, max_steps=3, save_every=1)
    full = run_train(tmp_path / "full", cfg, nproc=2)
    part = tmp_path / "part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=1"])
    copy = tmp_path / "moved_base"
    shutil.copytree(lab["base"], copy)  # another path, new mtimes, the same bytes
    run_train(part, {**cfg, "model": {**cfg["model"], "path": str(copy)}}, nproc=2, extra=["train.resume=auto"])
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]


def test_onpolicy_rollouts_train_and_resume_exactly(lab):
    """On-policy: each rank samples its groups (collective-free decoding after one gather), scores them and
    trains; the rollout seeds follow the step, so a resumed run repeats the uninterrupted one exactly."""
    cfg = grpo_config(lab, "x", max_steps=3, save_every=1)
    cfg["loss"] = {"name": "onpolicy", "kl_coef": 0.1, "ref_logprobs": "live", "entropy_coef": 0.01}
    cfg["rollout"] = {"temperature": 1.0, "max_new_tokens": 12}
    full = run_train(lab["root"] / "onpolicy_full", cfg, nproc=2)
    part = lab["root"] / "onpolicy_part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=2"])
    run_train(part, cfg, nproc=2, extra=["train.resume=auto"])
    whole = run_train(lab["root"] / "onpolicy_whole", cfg, nproc=2, extra=["model.shard_layers=false"])
    mf = metrics(full)
    assert [m["step"] for m in mf] == [1, 2, 3]
    assert all(0.0 <= m["data/reward_mean"] <= 1.0 and math.isfinite(m["loss"]) for m in mf)
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in mf]  # exact
    assert_same_weights(full / "hf" / "final", part / "hf" / "final", atol=0)
    # cost: every generated token is trained on (the rollouts' response tokens), counted once across the resume
    cost = json.loads((full / "run_summary.json").read_text())
    assert cost["tokens_generated_rollout"] == sum(m["perf/rollout_tokens"] for m in mf) == cost["tokens_trained"] > 0
    assert json.loads((part / "run_summary.json").read_text())["tokens_generated_rollout"] == cost[
        "tokens_generated_rollout"]
    # rollouts from a model that is one FSDP unit (the tiny lab's setting): the same samples and losses
    assert [m["loss"] for m in metrics(whole)] == pytest.approx([m["loss"] for m in mf], rel=1e-5)
    with pytest.raises(AssertionError):  # the entropy bonus moved the policy away from the base
        assert_same_weights(full / "hf" / "final", lab["base"], atol=1e-6)


def test_cached_reference_logprobs_equal_the_live_reference(lab):
    live = run_train(lab["root"] / "live", grpo_config(lab, "x"), nproc=2)
    cached = run_train(lab["root"] / "cached", grpo_config(lab, "x", loss={"ref_logprobs": "cached"}), nproc=2)
    ml, mc = metrics(live), metrics(cached)
    assert ml[-1]["policy/kl_mean"] > 0
    for key in ("loss", "policy/kl_mean", "grad_norm"):
        assert [m[key] for m in ml] == pytest.approx([m[key] for m in mc], rel=1e-5, abs=1e-7), key


def test_hf_export_matches_the_trained_state(lab, tmp_path):
    """The exported model (from_pretrained, plain HF) gives the log-probs of the trained FSDP state (DCP)."""
    out = run_train(lab["root"] / "export", grpo_config(lab, "x", max_steps=2, save_every=2), nproc=2)
    script = tmp_path / "check.py"
    script.write_text(EXPORT_CHECK)
    result = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), lab["base"], str(out), str(result)], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    res = json.loads(result.read_text())
    assert res["max_abs_diff"] < 1e-5 and res["moved_from_base"] > 1e-3


EXPORT_CHECK = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import checkpoint
import dist_utils
import model_utils as mu
base, out, result = sys.argv[1:]
d = dist_utils.setup_distributed()
model = mu.build_model(path=base, init_config=None, dist=d, param_dtype=torch.float32, reduce_dtype=torch.float32,
                       activation_checkpointing=False)
opt = torch.optim.AdamW(model.parameters())
checkpoint.load_state(checkpoint.latest_state(out + "/ckpt"), model, opt, dist=d)
tok = AutoTokenizer.from_pretrained(out + "/hf/final")
ids = torch.tensor([tok("Mod 7: a=3+4. Find a.")["input_ids"]])
mask = torch.ones_like(ids)
with torch.no_grad():
    trained = mu.sequence_logprobs(model, ids, mask)
    def naive(path):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    exported, start = naive(out + "/hf/final"), naive(base)
if d.rank == 0:
    json.dump({"max_abs_diff": (trained - exported).abs().max().item(),
               "moved_from_base": (exported - start).abs().max().item()}, open(result, "w"))
dist_utils.teardown_distributed()
'''


def test_cached_reference_on_changed_data_is_refused_on_resume_and_recomputed_before_the_first_step(lab, tmp_path):
    """The token copy and the ref_logprobs/ cache carry fingerprints of their inputs. Resumed (the policy has
    moved) on changed data: one line naming what changed, non-zero exit. Before the first update (no checkpoint): a fresh cache, the
    same losses as a run that never had the stale one."""
    import shutil
    data_path = tmp_path / "teacher.jsonl"
    shutil.copy(lab["data"] / "teacher.jsonl", data_path)
    cfg = grpo_config(lab, "x", loss={"ref_logprobs": "cached"}, max_steps=2, save_every=1)
    cfg["data"]["train_path"] = str(data_path)
    out = tmp_path / "run"
    run_train(out, cfg, nproc=2, extra=["train.stop_after=1"])
    lines = data_path.read_text().splitlines(keepends=True)
    data_path.write_text("".join(lines[1:]))  # another data file: the first question is gone
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           str(tmp_path / "run.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "]: Traceback" not in proc.stderr, proc.stderr[-3000:]  # (the ranks print one
    # line each; torchrun's own failure summary has a traceback of its own)
    # the token copy (token_cache) is checked first: the data the run trained on changed
    line = next(x for x in proc.stderr.splitlines() if "token copy" in x)
    assert line.startswith("data error: ") and line.endswith(
        "the token copy this run trained on was made from other inputs (data_size, index_sha256, order_sha256 "
        "changed); it cannot be remade once the policy moved: restore the data and tokenizer, or start a fresh "
        "output_dir")  # only what changed is named
    shutil.rmtree(out / "ckpt")
    (out / "metrics.jsonl").unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: token copy rebuilt (data_size, index_sha256, order_sha256 changed)" in proc.stdout
    assert "was made from other inputs; recomputing" in proc.stdout
    fresh = run_train(tmp_path / "fresh", cfg, nproc=2)
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(fresh)], rel=1e-6)


def test_num_questions_draws_a_subset_and_sets_the_step_count(lab):
    """data.num_questions: K questions drawn by the weights (the same on 1 and 2 ranks), written to
    questions.jsonl; epochs run over the subset, so steps = ceil(epochs * K / questions_per_step)."""
    records = [json.loads(line) for line in open(lab["data"] / "teacher.jsonl")]
    cfg = grpo_config(lab, "x", epochs=1.5, max_steps=-1)
    cfg["data"]["num_questions"] = 6
    cfg["data"]["agreement_weights"] = {0.0: 1.0, 0.99: 0.0}  # unanimous questions: weight 0, never drawn
    one = run_train(lab["root"] / "subset1", cfg, nproc=1)
    two = run_train(lab["root"] / "subset2", cfg, nproc=2)
    drawn = [json.loads(line) for line in open(one / "questions.jsonl")]
    assert drawn == [json.loads(line) for line in open(two / "questions.jsonl")]
    assert len(drawn) == 6 == len({q["id"] for q in drawn})
    by_id = {r["id"]: r for r in records}
    assert all(q["weight"] == 1.0 and by_id[q["id"]]["agreement"] < 0.99 for q in drawn)
    assert [m["step"] for m in metrics(one)] == list(range(1, math.ceil(1.5 * 6 / 4) + 1))  # 3 steps
    assert [m["loss"] for m in metrics(one)] == pytest.approx([m["loss"] for m in metrics(two)], rel=1e-5, abs=1e-7)


def test_validation_each_epoch_exports_epochs_keeps_the_best_and_survives_a_resume(lab):
    """validation.every_epochs=1 over 2 epochs: val/ rows, hf/epoch-1 and hf/epoch-2, hf/best a link to the
    epoch with the highest val/avg@n (the earlier on a tie) and best.json; stopped in epoch 2, or at the last
    step of epoch 1, and resumed: the same rows, exports and best."""
    cfg = grpo_config(lab, "x", epochs=2, max_steps=-1, save_every=1)
    cfg["data"]["num_questions"] = 8  # 2 steps per epoch
    cfg["validation"] = {"data": str(lab["data"] / "eval_id.jsonl"), "every_epochs": 1, "n": 2,
                         "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24, "instruction": False}
    full = run_train(lab["root"] / "val_full", cfg, nproc=2)
    rows = metrics(full)
    val = [r for r in rows if "val/epoch" in r]
    assert [(r["val/epoch"], r["step"]) for r in val] == [(1, 2), (2, 4)]
    assert all({"val/avg@n", "val/pass@1", "val/pass@2", "val/maj@n"} <= set(r) for r in val)
    best = json.loads((full / "best.json").read_text())
    scores = [r["val/avg@n"] for r in val]
    assert best["epoch"] == 1 + scores.index(max(scores)) and best["scores"]["val/avg@n"] == max(scores)
    assert best["step"] == 2 * best["epoch"]
    assert_same_weights(full / "hf" / "best", full / "hf" / f"epoch-{best['epoch']}", atol=0)
    assert os.readlink(full / "hf" / "best") == f"epoch-{best['epoch']}"  # a relative link, not a copy ...
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(full / "hf" / "best"))  # ... that loads
    assert os.readlink(full / "hf" / "final") == "epoch-2"  # the last step's export is not written twice
    with pytest.raises(AssertionError):  # the two epochs' exports differ (training moved the policy)
        assert_same_weights(full / "hf" / "epoch-1", full / "hf" / "epoch-2", atol=1e-7)
    assert_same_weights(full / "hf" / "epoch-2", full / "hf" / "final", atol=0)
    part = lab["root"] / "val_part"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=3"])
    assert [r["val/epoch"] for r in metrics(part) if "val/epoch" in r] == [1]
    run_train(part, cfg, nproc=2)
    assert metrics(part)[-1]["step"] == 4
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "perf/tokens_per_second", "val/seconds")}
                        for r in rs]
    assert strip(metrics(part)) == strip(rows)
    assert json.loads((part / "best.json").read_text()) == best
    assert_same_weights(part / "hf" / "best", full / "hf" / "best", atol=0)
    # the run's cost (run_summary.json, from metrics.jsonl): the resumed run counts each step and validation once
    cost, cost_part = (json.loads((p / "run_summary.json").read_text()) for p in (full, part))
    assert cost["steps"] == 4 and cost["tokens_trained"] == sum(r["tokens"] for r in rows if "val/epoch" not in r)
    assert cost["tokens_generated_validation"] == sum(r["val/tokens_generated"] for r in val) > 0
    assert 0 < cost["validation_seconds"] < cost["train_seconds"] and cost["tokens_generated_rollout"] == 0
    assert {k: cost_part[k] for k in cost_part if "seconds" not in k} == {k: cost[k] for k in cost if "seconds" not in k}
    # stopped at an epoch's last step (SIGTERM or stop_after there): saved before validating; the resumed run
    # validates that epoch first, on the same weights
    edge = lab["root"] / "val_edge"
    run_train(edge, cfg, nproc=2, extra=["train.stop_after=2"])
    assert not [r for r in metrics(edge) if "val/epoch" in r] and not (edge / "hf" / "epoch-1").exists()
    run_train(edge, cfg, nproc=2)
    assert strip(metrics(edge)) == strip(rows)
    assert_same_weights(edge / "hf" / "epoch-1", full / "hf" / "epoch-1", atol=0)
