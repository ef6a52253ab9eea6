"""Reliability: faults survived and bad input refused, with nothing lost -- real processes on CPU (gloo).

A rank SIGKILLed under torchrun --max-restarts, preemption by SIGTERM, crashes in the middle of a checkpoint
save (tests/_fault_run.py injects them; train.py has no test hooks), bad configs, bad data, non-finite steps,
and a static safety scan. Every fault run is compared with one uninterrupted reference run of the same config:
the same per-step losses (exactly), one metrics row per step, the same final weights (exactly).
"""
import ast
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import ENV, TINY_MODEL, assert_same_weights, make_lab_data, metrics, weights  # noqa: E402

STEPS = 8
# A fresh rendezvous store per torchrun attempt: restarts hang without it (dist_utils.setup_distributed).
RESTART_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Synthetic data (curated teacher groups) and the uninterrupted reference run (2 ranks, STEPS steps)."""
    root = tmp_path_factory.mktemp("faults")
    lab = {"root": root, "data": make_lab_data(root)}
    rc, log = finish(start(root / "reference", config(lab)))
    assert rc == 0, log
    lab["reference"] = root / "reference"
    assert [m["step"] for m in metrics(lab["reference"])] == list(range(1, STEPS + 1))
    return lab


def config(lab, **train_kw):
    return {"model": {"init_config": TINY_MODEL, "tokenizer": str(lab["data"] / "tokenizer")},
            "data": {"train_path": str(lab["data"] / "teacher.jsonl"), "group_size": 4, "max_len": 512},
            "loss": {"name": "offgrpo", "all_positive_bias": 0.5, "kl_coef": 0.1, "ref_logprobs": "live"},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "train": {"questions_per_step": 2, "micro_batch_size": 4, "max_steps": STEPS, "save_every": 1,
                      **train_kw}}


def start(out, cfg, *, nproc=2, restarts=0, script="train.py", extra=(), env=None):
    """torchrun in the background; stdout and stderr go to <out>.log (no pipe to fill while we poll)."""
    out = os.fspath(out)
    path = out + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump({**cfg, "output_dir": out}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", script, path, *extra]
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**RESTART_ENV, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
    proc.log_path = out + ".log"
    return proc


def finish(proc, timeout=300):
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # a hang: end the workers, then the launcher
            for pid in worker_pids(proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    with open(proc.log_path, errors="replace") as f:
        return rc, f.read()


def wait_for_step(out, step, proc, timeout=240):
    """Poll metrics.jsonl until a row with step >= `step` is complete (fails if the run ends first)."""
    path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}"
        if os.path.exists(path):
            with open(path) as f:
                done = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if done and done[-1] >= step:
                return done[-1]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def worker_pids(launcher_pid):
    """{rank: pid} of the torchrun launcher's worker processes."""
    pids = []
    for children in glob.glob(f"/proc/{launcher_pid}/task/*/children"):
        with open(children) as f:
            pids += [int(p) for p in f.read().split()]
    ranks = {}
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def assert_same_as_reference(lab, out):
    """One row per step (rows of re-run steps replaced, not duplicated), exact losses, exact final weights."""
    ref, got = metrics(lab["reference"]), metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert_same_weights(lab["reference"] / "hf" / "final", out / "hf" / "final", atol=0)


# --------------------------------------------------------------------------- 1. a rank dies

def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_result(lab):
    out = lab["root"] / "killed"
    proc = start(out, config(lab), restarts=1, extra=["train.resume=auto"])
    wait_for_step(out, 2, proc)
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)  # rank 0: it writes metrics and commits checkpoints
    rc, log = finish(proc)
    assert rc == 0, log[-5000:]
    assert "exitcode: -9" in log  # the launcher saw the kill ...
    resumed = re.search(r"resumed from (\S+)/step-(\d+) at step (\d+)", log)  # ... and the restart resumed
    assert resumed and resumed[1] == str(out / "ckpt") and resumed[2] == resumed[3], log[-5000:]
    assert_same_as_reference(lab, out)


# --------------------------------------------------------------------------- 2. preemption

def test_sigterm_saves_the_current_step_and_the_resumed_run_loses_nothing(lab):
    out = lab["root"] / "preempted"
    cfg = config(lab, save_every=100)  # the only checkpoint is the one SIGTERM asks for
    proc = start(out, cfg)
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it to the workers
    rc, log = finish(proc)
    last = metrics(out)[-1]["step"]
    assert 2 <= last < STEPS, log[-5000:]
    assert f"SIGTERM: saved state at step {last}; exiting" in log
    assert sorted(os.listdir(out / "ckpt")) == [f"step-{last}"]  # the last logged step; no .tmp left
    assert os.path.isfile(out / "ckpt" / f"step-{last}" / "COMPLETE")
    assert not (out / "hf" / "final").exists()
    rc, log = finish(start(out, cfg, extra=["train.resume=auto"]))
    assert rc == 0 and f"resumed from {out / 'ckpt'}/step-{last} at step {last}" in log, log[-5000:]
    assert_same_as_reference(lab, out)


# --------------------------------------------------------------------------- 3. a crash while saving

def test_crash_mid_save_keeps_the_previous_checkpoint_and_resume_takes_it(lab):
    """Attempt 0: rank 1 dies with its step-3 state half written (no COMPLETE marker); attempt 1: rank 0 dies
    after COMPLETE is in step-5.tmp but before the rename that commits it; attempt 2 finishes. Each fresh
    attempt must see the previous checkpoint as the latest and train.py resumes from it."""
    out = lab["root"] / "crashsave"
    faults = [{"kind": "torn_rank_file", "step": 3, "rank": 1}, {"kind": "kill_before_commit", "step": 5, "rank": 0}]
    probe = lab["root"] / "crashsave.probe.jsonl"
    proc = start(out, config(lab), restarts=2, script="tests/_fault_run.py", extra=["train.resume=auto"],
                 env={"OFFGRPO_FAULTS": json.dumps(faults), "OFFGRPO_PROBE": str(probe)})
    rc, log = finish(proc)
    assert rc == 0, log[-5000:]
    ckpt = out / "ckpt"
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert seen[1:] == [
        {"attempt": 1, "latest": str(ckpt / "step-2"), "dirs": {"step-1": True, "step-2": True, "step-3.tmp": False}},
        {"attempt": 2, "latest": str(ckpt / "step-4"), "dirs": {"step-3": True, "step-4": True, "step-5.tmp": True}}]
    assert f"resumed from {ckpt}/step-2 at step 2" in log and f"resumed from {ckpt}/step-4 at step 4" in log
    assert sorted(os.listdir(ckpt)) == ["step-7", "step-8"]  # the re-saves replaced the half-written dirs
    assert_same_as_reference(lab, out)  # rows 3 and 5 of the crashed attempts were dropped on resume


def test_restarts_without_a_fresh_rendezvous_store_are_refused(monkeypatch):
    import dist_utils
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", TORCHELASTIC_MAX_RESTARTS="1",
                           TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        dist_utils.setup_distributed()


# --------------------------------------------------------------------------- 3b. the reference pre-pass

def prepass_config(lab):
    """Cached reference, one sequence per micro-batch (24 per rank), a shard every 4: 6 shards per rank."""
    cfg = config(lab, micro_batch_size=1, max_steps=2)
    cfg["loss"] = {**cfg["loss"], "ref_logprobs": "cached", "ref_shard_every": 4}
    return cfg


@pytest.fixture(scope="module")
def prepass_reference(lab):
    out = lab["root"] / "prepass_reference"
    rc, log = finish(start(out, prepass_config(lab)))
    assert rc == 0, log[-5000:]
    return out


def cached_logprobs(out):
    import reference
    cache = reference.RefCache(str(out / "ref_logprobs"), 2)
    return {k: cache._get(k) for k in sorted(cache.where)}


def assert_same_prepass(reference_run, out):
    """The cache of an interrupted-and-resumed pre-pass equals the uninterrupted one exactly (every key), and so
    do the training steps after it."""
    ref, got = cached_logprobs(reference_run), cached_logprobs(out)
    assert ref.keys() == got.keys() and len(ref) == 12 * 4
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference_run)]
    assert os.path.isfile(out / "ref_logprobs" / "COMPLETE")


def test_prepass_killed_midway_resumes_and_equals_an_uninterrupted_one(lab, prepass_reference):
    """Rank 1 dies as it writes its 3rd shard (2 committed: micro-batches 0-8); rank 0 may have committed more.
    The restart resumes at the micro-batch both committed, not at 0, and ends with the uninterrupted cache."""
    out = lab["root"] / "prepass_killed"
    faults = [{"kind": "kill_in_prepass", "step": 3, "rank": 1}]
    proc = start(out, prepass_config(lab), restarts=1, script="tests/_fault_run.py",
                 env={"OFFGRPO_FAULTS": json.dumps(faults), "OFFGRPO_PROBE": str(out) + ".probe.jsonl"})
    rc, log = finish(proc)
    assert rc == 0, log[-5000:]
    assert "exitcode: -9" in log and "ref logprobs: resuming the pre-pass at micro-batch 8 of 24" in log, log[-5000:]
    assert_same_prepass(prepass_reference, out)


def test_sigterm_inside_the_prepass_exits_0_with_its_shards(lab, prepass_reference):
    """SIGTERM reaches the launcher after rank 0's first shard: every rank commits its partial shard at the same
    micro-batch and exits 0 (no traceback, nothing trained); the next start resumes there and ends equal."""
    out = lab["root"] / "prepass_sigterm"
    faults = [{"kind": "sigterm_in_prepass", "step": 1, "rank": 0}]
    proc = start(out, prepass_config(lab), script="tests/_fault_run.py",
                 env={"OFFGRPO_FAULTS": json.dumps(faults), "OFFGRPO_PROBE": str(out) + ".probe.jsonl"})
    rc, log = finish(proc)
    stopped = re.search(r"SIGTERM: reference pre-pass stopped after micro-batch (\d+) of 24", log)
    assert stopped and 4 <= int(stopped[1]) < 24, log[-5000:]
    # the workers exited 0: no traceback of theirs ("[rank<r>]: Traceback"), no failure summary ("exitcode"); the
    # launcher's own SignalException traceback is torchrun's way to exit after a SIGTERM (README: Preemption)
    assert "]: Traceback" not in log and "exitcode" not in log, log[-5000:]
    ends = [sorted(int(n.split("-")[2].split(".")[0]) for n in os.listdir(out / "ref_logprobs" / f"rank{r}"))
            for r in range(2)]
    assert ends[0][-1] == ends[1][-1] == int(stopped[1])  # both ranks' shards end where they stopped
    assert not (out / "ref_logprobs" / "COMPLETE").exists() and not (out / "metrics.jsonl").exists()
    rc, log = finish(start(out, prepass_config(lab)))
    assert rc == 0 and f"resuming the pre-pass at micro-batch {stopped[1]} of 24" in log, log[-5000:]
    assert_same_prepass(prepass_reference, out)


# --------------------------------------------------------------------------- 3c. a slow rank in validation

def test_a_rank_slow_in_validation_does_not_kill_the_job(lab):
    """Rank 1 finishes its validation samples 25 s after rank 0, past train.collective_timeout_s = 15 s: the
    gather waits on a group of its own whose timeout covers the validation budget (15 s + calls x 300 new
    tokens x 0.1 s), so the run validates, exports and ends."""
    out = lab["root"] / "slow_validation"
    cfg = config(lab, max_steps=-1, epochs=1, collective_timeout_s=15)
    cfg["data"]["num_questions"] = 4  # 2 steps, then the epoch's validation
    cfg["validation"] = {"data": str(lab["data"] / "eval_id.jsonl"), "every_epochs": 1, "n": 2,
                         "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 300, "instruction": False}
    faults = [{"kind": "slow_validation", "step": 25, "rank": 1}]
    proc = start(out, cfg, script="tests/_fault_run.py",
                 env={"OFFGRPO_FAULTS": json.dumps(faults), "OFFGRPO_PROBE": str(out) + ".probe.jsonl"})
    t0 = time.time()
    rc, log = finish(proc)
    assert rc == 0, log[-5000:]
    assert time.time() - t0 > 25  # the slow rank really was slow
    assert [r["val/epoch"] for r in metrics(out) if "val/epoch" in r] == [1]
    assert os.path.isdir(out / "hf" / "epoch-1") and os.path.islink(out / "hf" / "final")


# --------------------------------------------------------------------------- 4. bad configs

def run_plain(cfg_path, *overrides):
    """train.py as one plain process (world of 1): its own stderr, no launcher output around it."""
    return subprocess.run([sys.executable, "train.py", str(cfg_path), *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("text, override, message", [
    (b"output_dir: OUT\nloss: {name: sft\n", None,
     "c.yaml: invalid YAML: expected ',' or '}', but got '<stream end>' (line 3, column 1)"),
    (b"- output_dir: OUT\n", None, "c.yaml: expected a mapping of sections, got list"),
    (b"output_dir: OUT\nloss: 5\n", None, "loss: expected a section (mapping), got 5"),
    (b"output_dir: OUT\nloss: {name: \xff}\n", None, "c.yaml: invalid YAML: unacceptable character #x00ff"),
    (b"", None, "output_dir is required"),
    (b"output_dir: OUT\n", "output_dir.sub=1", "override 'output_dir.sub=1': 'output_dir' is not a section"),
    (b"output_dir: OUT\n", "loss.kl_coef=[0.1", "override 'loss.kl_coef=[0.1': invalid YAML: expected ',' or ']'"),
    (b"output_dir: OUT\n", "loss.kl_coef", "override 'loss.kl_coef' is not of the form section.key=value"),
])
def test_bad_config_is_refused_in_one_line(tmp_path, text, override, message):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_bytes(text.replace(b"OUT", str(out).encode()))
    proc = run_plain(path, *([override] if override else []))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("config error: ") and message in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- 5. bad data

def test_bad_curated_lines_are_counted_then_refused_above_one_percent(lab, tmp_path):
    recs = [json.loads(line) for line in open(lab["data"] / "teacher.jsonl")]
    good = [{**r, "id": f"{r['id']}-{i}"} for i in range(10) for r in recs]  # > 100 questions
    short = {**recs[0], "id": "short", "responses": recs[0]["responses"][:2], "rewards": recs[0]["rewards"][:2]}
    lines = [(json.dumps(r) + "\n").encode() for r in good + [short]]
    torn = b'{"id": "torn", "question": "Mod 7: a=1+2. Find a.", "responses": ["<think>\n'  # a line cut short
    one_bad = lines[:60] + [torn] + lines[60:]  # 1 of len(good) + 2 lines malformed (< 1%)
    assert len(good) >= 100
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(b"".join(one_bad))
    cfg = {**config(lab, max_steps=1), "data": {**config(lab)["data"], "train_path": str(path)},
           "output_dir": str(tmp_path / "ok")}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_plain(tmp_path / "ok.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"read_records: skipped 1/{len(one_bad)} malformed lines: {{'bad_json': {{'count': 1, 'first': '{path}:61'}}}}"
            in proc.stdout)
    assert f"data: {len(good)} questions x 4 responses" in proc.stdout and "'questions_dropped_too_few_fit': 1" in proc.stdout
    assert len(metrics(tmp_path / "ok")) == 1 and math.isfinite(metrics(tmp_path / "ok")[0]["loss"])

    empty = {**recs[1], "id": "empty", "responses": [""] + recs[1]["responses"][1:]}
    no_turns = {k: v for k, v in recs[2].items() if k != "responses"}
    more_bad = one_bad + [b"\xff\xfe not utf-8\n", (json.dumps(empty) + "\n").encode(),
                          (json.dumps(no_turns) + "\n").encode()]  # 4 malformed lines: > 1%
    n = len(more_bad)
    path = tmp_path / "more_bad.jsonl"
    path.write_bytes(b"".join(more_bad))
    cfg = {**cfg, "data": {**cfg["data"], "train_path": str(path)}, "output_dir": str(tmp_path / "bad")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_plain(tmp_path / "bad.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"data error: read_records({path}): 4/{n} lines malformed (> 1%): bad_json x1 (first at {path}:61), "
        f"bad_responses x1 (first at {path}:{n - 1}), missing_responses x1 (first at {path}:{n}), "
        f"non_utf8 x1 (first at {path}:{n - 2})")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- 6. numerics

def test_nonfinite_steps_are_skipped_then_abort_names_the_step(lab, tmp_path):
    """A NaN in one weight of the base model: every step is non-finite. Steps 1..K-1 are logged with the skip
    counter and leave the weights untouched; step K aborts with one line naming it."""
    base = tmp_path / "nan_base"
    shutil.copytree(lab["reference"] / "hf" / "final", base)
    from safetensors.torch import save_file
    state = weights(base)
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**config(lab, max_nonfinite=3, hf_every=1), "output_dir": str(tmp_path / "run")}
    cfg["model"] = {"path": str(base)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_plain(tmp_path / "c.yaml")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: 3 non-finite steps in a row (last at step 3); aborting"
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and [r["loss/nonfinite_skipped"] for r in rows] == [1, 2]
    assert all(math.isnan(r["loss"]) and math.isnan(r["grad_norm"]) for r in rows)
    assert "step 2: non-finite loss nan / grad norm nan; step skipped" in proc.stdout
    for step in (1, 2):  # skipped steps leave the weights exactly as loaded
        saved = weights(tmp_path / "run" / "hf" / f"step-{step}")
        assert saved.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(saved[k], state[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert not (tmp_path / "run" / "hf" / "final").exists()


def test_log_ratios_are_clamped_before_exp():
    import loss as L
    logp = torch.full((2, 3), -50.0, requires_grad=True)  # [B, T]
    far = torch.full((2, 3), 1e4)  # log-ratios of 1e4 would overflow exp()
    adv = torch.tensor([1.0, -1.0])  # [B]
    total = (L.on_policy_grpo_token_loss(logp, logp.detach() - far, adv, ref_logp=far, kl_coef=0.1).sum()
             + L.kl_k3(logp, -far).sum())
    total.backward()
    assert L.MAX_LOG_RATIO <= 20 and torch.isfinite(total) and torch.isfinite(logp.grad).all()


# --------------------------------------------------------------------------- 7. safety

def python_files():
    skip = {".git", "data", "runs", "outputs", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))


def unsafe_calls(path):
    """(line, what) for each pickle-based load/save, unsafe YAML load or trust_remote_code=True in a file."""
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [(node.lineno, f"import {n}") for n in names
                      if n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "shelve", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        true = lambda name: isinstance(kw.get(name), ast.Constant) and kw[name].value is True  # noqa: E731
        if func == "torch.load" and not true("weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if func == "torch.save":
            found.append((node.lineno, "torch.save (checkpoints are safetensors / DCP)"))
        if func == "yaml.load" or func == "yaml.unsafe_load":
            found.append((node.lineno, func))
        for name in ("trust_remote_code", "allow_pickle"):
            if true(name):
                found.append((node.lineno, f"{name}=True"))
    return found


def test_no_pickle_no_unsafe_load_no_remote_code(tmp_path):
    files = list(python_files())
    assert len(files) >= 15 and os.path.join(ROOT, "train.py") in files
    bad = {os.path.relpath(f, ROOT): unsafe_calls(f) for f in files}
    assert {f: b for f, b in bad.items() if b} == {}
    for probe in ("import pickle", "from dill import loads", "torch.load(f)", "torch.load(f, weights_only=False)",
                  "yaml.load(s)", "AutoModel.from_pretrained(p, trust_remote_code=True)", "torch.save(m, p)"):
        path = tmp_path / "probe.py"  # the scan does see each of these
        path.write_text(probe + "\n")
        assert unsafe_calls(path), probe
    import train
    assert train.ModelConfig().trust_remote_code is False
    for cfg_path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True):
        assert train.load_config(cfg_path, [], check_paths=False).model.trust_remote_code is False, cfg_path
