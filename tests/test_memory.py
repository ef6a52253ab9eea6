"""benchmarks/memory.py: the fake-tensor rehearsal of the real job, at a reduced depth and length so it runs in
seconds (2 of the 7B's 28 layers, 2,048 tokens); the full-size figures are in the README."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "configs", "models", "OpenThinker3-7B", "config.json")
GIB = 2**30


@pytest.fixture(scope="module")
def shallow_7b(tmp_path_factory):
    """OpenThinker3-7B's shipped config.json with 2 layers (every other shape real)."""
    d = tmp_path_factory.mktemp("OpenThinker3-7B-2layers")
    with open(SHIPPED) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    return d, cfg


def run_memory(config, *args, overrides=()):
    proc = subprocess.run([sys.executable, "benchmarks/memory.py", config, *overrides, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc


def shallow_params(cfg):
    h, v, L, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = h * (h + 2 * kv + h) + (h + 2 * kv) + 3 * h * inter + 2 * h  # q,k,v,o (+ q/k/v biases), MLP, 2 norms
    return 2 * v * h + L * layer + h  # untied embedding + lm_head, layers, final norm


@pytest.mark.parametrize("config, phases", [
    ("configs/bias05.yaml", {"ref_prepass", "train_step", "optimizer_step", "validation", "hf_export"}),
    ("configs/onpolicy.yaml", {"train_step", "optimizer_step", "rollout", "validation", "hf_export"}),
])
def test_rehearsal_reports_every_phase_and_the_persistent_state_by_hand(shallow_7b, tmp_path, config, phases):
    model_dir, cfg = shallow_7b
    out = tmp_path / "mem.json"
    proc = run_memory(config, "--world", "8", "--gpu-memory", "80", "--json", str(out),
                      overrides=[f"model.path={model_dir}", "data.max_len=2048"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["fits"] is True and res["world"] == 8 and res["gpu_memory_gib"] == 80
    assert set(res["phases"]) == phases
    n = shallow_params(cfg)
    step = res["phases"]["train_step"]
    # AdamW's two fp32 moments, sharded over 8 ranks: 8 bytes per parameter / 8; with the fp32 master weights 12
    assert step["optimizer"] == pytest.approx(8 * n / 8 / GIB, rel=0.02)
    assert step["peak_gib"] > 12 * n / 8 / GIB
    opt_step = res["phases"]["optimizer_step"]  # (+ a live reference model's fp32 shards, on-policy)
    assert opt_step["peak_gib"] - opt_step.get("ref_model_sharded_gib", 0) == pytest.approx(20 * n / 8 / GIB, rel=0.02)
    assert opt_step.get("ref_model_sharded_gib", 4 * n / 8 / GIB) == pytest.approx(4 * n / 8 / GIB, rel=0.02)
    if "ref_prepass" in phases:  # batched like training: never above the training step
        assert res["phases"]["ref_prepass"]["peak_gib"] <= step["peak_gib"]
    if "rollout" in phases:  # KV cache from the shapes: rows x (prompt + new) x 2 x layers x kv heads x head dim x 2 B
        r = res["phases"]["rollout"]
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        seq = 1 + 31744  # prompt (max_len - max_new_tokens, at least 1) + rollout.max_new_tokens
        kv = r["rows_per_call"] * seq * 2 * 2 * cfg["num_key_value_heads"] * head_dim * 2 / GIB
        assert r["kv_cache_gib"] == pytest.approx(kv, rel=1e-6)
        assert r["rows_per_call"] == 262144 // seq  # onpolicy.yaml's rollout.max_batch_tokens
    # the export gathers in the storage dtype (bf16 for the 7B's config): rank 0's host holds 2 bytes per parameter
    assert res["phases"]["hf_export"]["host_gib"] == pytest.approx(2 * n / GIB, rel=1e-6)
    for name in phases:
        assert "DOES NOT FIT" not in proc.stdout and name in proc.stdout


def test_vllm_rollouts_count_the_engine_and_the_weight_sync(shallow_7b, tmp_path):
    """rollout.backend=vllm: the rollout and validation phases hold the sharded policy (no unsharded copy), the
    engine's preallocation (vllm_gpu_memory_utilization x --gpu-memory) and the sync's largest transient, one
    decoder layer in bf16 + the largest parameter in fp32."""
    model_dir, cfg = shallow_7b
    out = tmp_path / "mem.json"
    proc = run_memory("configs/onpolicy.yaml", "--world", "8", "--gpu-memory", "80", "--json", str(out),
                      overrides=[f"model.path={model_dir}", "data.max_len=2048", "rollout.backend=vllm",
                                 "rollout.vllm_gpu_memory_utilization=0.25"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(out.read_text())["phases"]
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = h * (h + 2 * kv + h) + (h + 2 * kv) + 3 * h * inter + 2 * h
    n = shallow_params(cfg)
    for name in ("rollout", "validation"):
        r = phases[name]
        assert r["engine_gib"] == pytest.approx(0.25 * 80)
        assert r["sync_gib"] == pytest.approx((2 * layer + 4 * v * h) / GIB, rel=1e-6)
        assert r["host_gib"] == 0.0  # the engine sleeps at level 2: its weights are dropped, not kept on the host
        persistent = r["peak_gib"] - r["engine_gib"] - r["sync_gib"] - r["ref_model_sharded_gib"]
        assert persistent == pytest.approx(phases["hf_export"]["parameters"] + phases["hf_export"]["optimizer"]
                                           - r["ref_model_sharded_gib"], rel=0.05)  # the shards, nothing gathered
    assert "vLLM engine 20.0 GiB" in proc.stdout


def test_too_small_a_budget_exits_non_zero(shallow_7b, tmp_path):
    model_dir, _ = shallow_7b
    proc = run_memory("configs/bias05.yaml", "--world", "8", "--gpu-memory", "3", "--json", str(tmp_path / "m.json"),
                      overrides=[f"model.path={model_dir}", "data.max_len=2048"])
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout
    assert json.loads((tmp_path / "m.json").read_text())["fits"] is False


def test_bad_input_is_one_line(tmp_path):
    proc = run_memory("configs/bias05.yaml", "--world", "8", "--gpu-memory", "80", overrides=["loss.kll_coef=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("memory.py: error: unknown key 'loss.kll_coef'")
    proc = run_memory("configs/bias05.yaml", "--world", "3", "--gpu-memory", "80")
    assert proc.returncode == 2 and "not divisible by --world 3" in proc.stderr
