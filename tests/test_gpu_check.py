"""launch/gpu_check.sh without a GPU: its arguments, its refusal on a CPU machine, and every part's code path under
the CPU fallbacks (--device cpu --tiny: the Triton interpreter, tiny shapes, train.py's CPU path, fake-tensor
memory predictions), so that a typo in a part is found here and not in the first minute of a GPU. vLLM is not
installed in this environment: its part runs against a stand-in `vllm` package (HF greedy decoding behind LLM's
API) written by the tests, and is SKIPped without it. The parts' comparison logic is also checked on made-up
numbers (the CPU cannot produce a GPU's)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gpu_check import common, memory_check, speed, train_check  # noqa: E402

SCRIPT = ROOT / "launch" / "gpu_check.sh"

STUB = '''"""A stand-in for vllm (tests/test_gpu_check.py): HF greedy decoding behind vLLM's LLM / SamplingParams."""
import torch
from transformers import AutoModelForCausalLM


class SamplingParams:
    def __init__(self, temperature, top_p, max_tokens, seed=None):
        self.temperature, self.max_tokens = temperature, max_tokens


class _Out:
    def __init__(self, ids):
        self.outputs = [type("Completion", (), {"token_ids": ids})()]


class LLM:
    def __init__(self, model, seed, dtype, max_model_len, distributed_executor_backend, enforce_eager, **kw):
        BROKEN
        self.m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.m.load_weights = lambda weights: [self.m.get_parameter(n).data.copy_(t) for n, t in weights]
        self.eos = self.m.generation_config.eos_token_id

    def generate(self, prompts, params, use_tqdm=False):
        assert params.temperature == 0
        outs = []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            with torch.no_grad():
                out = self.m.generate(ids, max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=self.eos,
                                      pad_token_id=self.eos)
            outs.append(_Out(out[0, ids.shape[1]:].tolist()))
        return outs

    def apply_model(self, fn):
        return [fn(self.m)]

    def reset_prefix_cache(self):
        pass

    def sleep(self, level=1):
        pass

    def wake_up(self):
        pass
'''


def write_stub(root, broken=False):
    pkg = root / "vllm"
    (pkg / "model_executor" / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text(STUB.replace("BROKEN", "raise RuntimeError('stub engine broken on purpose')"
                                                  if broken else "pass"))
    (pkg / "model_executor" / "__init__.py").write_text("")
    (pkg / "model_executor" / "layers" / "__init__.py").write_text("")
    (pkg / "model_executor" / "layers" / "utils.py").write_text(
        "def dispatch_cpu_unquantized_gemm(layer, remove_weight):\n    pass\n")
    return root


def run(*args, env=None, timeout=1800):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # (conftest sets it; the parts set it themselves for --device cpu)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- arguments and refusal

@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--only", "kernels,gemm"], "--only: unknown part 'gemm'"),
    (["--device", "tpu"], "--device tpu: must be cuda or cpu"),
    (["--device", "cpu"], "--device cpu runs only with --tiny"),
    (["--out"], "--out needs a value"),
])
def test_bad_arguments_are_one_line_exit_2_nothing_written(tmp_path, args, message):
    proc = run(*args, "--out", str(tmp_path / "out")) if args != ["--out"] else run(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_help():
    proc = run("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash launch/gpu_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cpu_machine_is_refused_at_once_with_one_line(tmp_path):
    proc = run("--quick", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "nothing was run" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
@pytest.mark.parametrize("args, message", [([], "--device cuda: no CUDA GPU here"),
                                           (["--device", "cpu"], "--device cpu runs only with --tiny")])
def test_a_part_alone_refuses_like_the_launcher(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check.kernels", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_installed_benchmarks_package_that_shadows_the_parts_is_one_line(tmp_path):
    """`benchmarks` has no __init__.py, so a regular package of that name elsewhere on the path wins its import."""
    (tmp_path / "site" / "benchmarks").mkdir(parents=True)
    (tmp_path / "site" / "benchmarks" / "__init__.py").write_text("")
    proc = run("--device", "cpu", "--tiny", "--out", str(tmp_path / "out"), env={"PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "does not find this repository's" in proc.stderr and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- every part on the CPU fallbacks

def test_every_part_runs_on_the_cpu_fallbacks(tmp_path):
    """The whole check, --device cpu --tiny: five PASS lines, five JSON records whose checks all hold."""
    stub = write_stub(tmp_path / "stub")
    out = tmp_path / "out"
    proc = run("--device", "cpu", "--tiny", "--out", str(out), env={"PYTHONPATH": str(stub)})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(lines) == 7 and lines[0].startswith("gpu_check: CPU fallbacks") and "5 passed, 0 failed" in lines[-1]
    assert [line.split(":")[0] for line in lines[1:-1]] == [f"PASS {p}" for p in common.PARTS]
    rec = {p: json.loads((out / f"{p}.json").read_text()) for p in common.PARTS}
    for p, r in rec.items():
        assert r["status"] == "pass" and r["checks"] and all(c["ok"] for c in r["checks"]), (p, r["checks"])
        assert (out / f"{p}.log").exists()
    assert set(rec["kernels"]["cases"]) == {"main", "unaligned", "logp_only"}
    assert all(c["triton"]["deterministic"] for c in rec["kernels"]["cases"].values())
    assert set(rec["speed"]["shapes"][0]["variants"]) == {"naive", "torch", "triton", "triton_logp"}
    assert set(rec["speed"]["skipped"]) == {"liger", "cce"}
    assert {k.split("@")[0] for k in rec["memory"]["phases"]} == {"ref_prepass", "train_step", "optimizer_step",
                                                                 "hf_export"}
    assert all(v["predicted_gib"] > 0 for v in rec["memory"]["phases"].values())
    assert [r["step"] for r in rec["train"]["bias05"]] == [1, 2] and rec["train"]["resume_bitwise"] is True
    assert rec["vllm"]["same_after_sync"] == rec["vllm"]["problems"] and rec["vllm"]["same_stale"] == 0


def test_without_vllm_its_part_is_skipped(tmp_path):
    proc = run("--device", "cpu", "--tiny", "--only", "vllm", "--out", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.splitlines()[1].startswith("SKIP vllm: vllm is not installed")
    assert json.loads((tmp_path / "vllm.json").read_text())["status"] == "skip"


def test_a_failing_part_does_not_stop_the_others_and_the_exit_is_1(tmp_path):
    """vllm first, failing (its engine raises), then speed, which still runs and passes."""
    stub = write_stub(tmp_path / "stub", broken=True)
    proc = run("--device", "cpu", "--tiny", "--only", "vllm,speed", "--out", str(tmp_path / "out"),
               env={"PYTHONPATH": str(stub)})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[1].startswith("FAIL vllm: RuntimeError: stub engine broken on purpose")
    assert lines[2].startswith("PASS speed:") and "1 passed, 1 failed" in lines[-1]
    rec = json.loads((tmp_path / "out" / "vllm.json").read_text())
    assert rec["status"] == "fail" and "Traceback" in rec["error"]


def test_a_part_over_its_budget_is_killed_and_fails(tmp_path):
    proc = run("--device", "cpu", "--tiny", "--only", "kernels", "--out", str(tmp_path),
               env={"GPU_CHECK_BUDGET_SCALE": "0.001"})
    assert proc.returncode == 1 and proc.stdout.splitlines()[1].startswith("FAIL kernels: over its budget of 1 s")
    assert json.loads((tmp_path / "kernels.json").read_text())["status"] == "fail"


def test_a_killed_part_keeps_the_checks_it_finished(tmp_path):
    """SIGTERM (what `timeout` sends at the budget) mid-part: FAIL, exit 1, the JSON holds the checks done so far."""
    code = ("import sys, time\nfrom benchmarks.gpu_check import common\n"
            "def body(args, rep):\n    rep.check('first', True)\n    print('in body', flush=True)\n"
            "    time.sleep(300)\n"
            "common.run('kernels', body, ['--device', 'cpu', '--tiny', '--out', sys.argv[1]])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in body"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out.startswith("FAIL kernels: killed by SIGTERM"), out
    rec = json.loads((tmp_path / "kernels.json").read_text())
    assert rec["status"] == "fail" and rec["checks"] == [{"name": "first", "ok": True}]


# --------------------------------------------------------------------------- the comparisons, on made-up numbers

def test_memory_comparison_flags_an_underestimate_and_a_missed_phase():
    rep = common.Report("memory", None)
    predicted = {8192: {"train_step": 20.0, "ref_prepass": 10.0, "optimizer_step": 4.0}}
    measured = {8192: {"train_step": (21.0, 22.0), "ref_prepass": (11.4, 12.0), "optimizer_step": (1.5, 2.0)}}
    table, worst = memory_check.compare(rep, predicted, measured)
    ok = {c["name"]: c["ok"] for c in rep.checks}
    # 21 <= 1.1 * 20 + 0.25; 11.4 > 1.1 * 10 + 0.25 (too optimistic); 1.5 < 0.5 * 4 - 0.25 (a phase missed)
    assert ok == {"train_step N=8192": True, "ref_prepass N=8192": False, "optimizer_step N=8192": False}
    assert table["train_step@8192"]["ratio"] == pytest.approx(1.05) and worst == ("optimizer_step@8192", 0.375)


def test_train_comparisons_use_the_stated_tolerances():
    rep = common.Report("train", type("A", (), {"device": "cuda"})())
    cpu = [{"step": 1, "loss": 2.0, "grad_norm": 1.0}, {"step": 2, "loss": 0.1, "grad_norm": 1.0}]
    dev = [{"step": 1, "loss": 2.0 + 0.0249, "grad_norm": 1.049}, {"step": 2, "loss": 0.1 + 0.0062, "grad_norm": 0.94}]
    train_check.compare_device_cpu(rep, "x", dev, cpu, rep.args)
    ok = {c["name"]: c["ok"] for c in rep.checks}
    assert ok == {"x step 1 loss": True, "x step 1 grad_norm": True, "x step 2 loss": False,
                  "x step 2 grad_norm": False, "x steps": True,
                  "x ran on the GPU (its losses differ from fp32's)": True}
    rep2 = common.Report("train", None)
    rows, bitwise = train_check.compare_resume(rep2, cpu, [cpu[0], {**cpu[1], "loss": 0.1 + 2e-4}])
    assert [c["ok"] for c in rep2.checks] == [True, False, True] and bitwise is False


def test_speed_reads_the_autotune_pick_from_the_autotuner_launches_use():
    """The autotuner the launcher builds (triton_logprob._tuned, one per kernel and candidate list) holds the pick
    per key in .cache; the part names it by its index in tiles_for's list (a pick is planted: nothing runs here)."""
    import triton

    import triton_logprob as tlp
    cands = tlp.tiles_for((9, 0), torch.bfloat16)[1]
    t = cands[1]
    cfg = triton.Config(t.meta, num_warps=t.num_warps, num_stages=t.num_stages)
    assert speed._candidate_index(cfg, cands) == 1
    assert speed._candidate_index(triton.Config({**t.meta, "BLOCK_N": 32}, num_warps=4, num_stages=1), cands) is None
    tuner = tlp._tuned(tlp._dz_kernel, cands)
    key = (3584, 152064, 2048, "torch.bfloat16")
    tuner.cache[key] = cfg
    try:
        picks = speed.picks_of((9, 0))
    finally:
        del tuner.cache[key]
    assert picks["dz"][str(key)] == {**t.meta, "num_warps": t.num_warps, "num_stages": t.num_stages, "candidate": 1}
