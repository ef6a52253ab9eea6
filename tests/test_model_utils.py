"""model_utils: FSDP2 build/log-probs/generate/save/resume against an unsharded HF model (CPU, gloo).

The distributed checks run in real processes (tests/_model_utils_worker.py): 2 ranks under torchrun and
1 rank under plain `python` (the world-of-1 path of setup_distributed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import dist_utils
import model_utils as mu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_model_utils_worker.py")


def run_worker(check: str, nproc: int, tmp_path) -> None:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(launcher + [WORKER, check, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"OK {check} world={nproc}" in proc.stdout


@pytest.mark.parametrize("nproc", [1, 2])
def test_logprobs_grads_generate_match_unsharded(nproc, tmp_path):
    """Tied and untied; log-probs, entropy and (rank-summed) gradients equal the unsharded model's;
    greedy generate equals HF's; parameters are sharded DTensors after every no-backward pass."""
    run_worker("logprobs", nproc, tmp_path)


def test_save_hf_round_trip(tmp_path):
    """save_hf -> from_pretrained/AutoTokenizer and build_model(path) give the same log-probs (tied,
    sharded index); a bf16 config is stored in bf16 and loads back into fp32 master weights."""
    run_worker("hf", 2, tmp_path)


def test_save_state_load_state_round_trip(tmp_path):
    """save_state/load_state restore weights, AdamW state, RNG and per-rank extras; keep=2 prunes;
    resuming into a fresh model + optimizer gives the identical next step."""
    run_worker("state", 2, tmp_path)


def _fake_state(root, name, marker: bool, world_size=1):
    os.makedirs(root / name)
    if marker:
        (root / name / checkpoint.COMPLETE_MARKER).write_text(json.dumps({"step": 0, "world_size": world_size}))


def test_latest_state_ignores_tmp_and_unmarked(tmp_path):
    assert checkpoint.latest_state(str(tmp_path / "missing")) is None
    _fake_state(tmp_path, "step-2", marker=True)
    _fake_state(tmp_path, "step-10", marker=True)
    _fake_state(tmp_path, "step-11", marker=False)      # crashed between dcp.save and the marker
    _fake_state(tmp_path, "step-12.tmp", marker=True)   # crashed between the marker and the rename
    _fake_state(tmp_path, "step-13.old", marker=True)
    assert checkpoint.latest_state(str(tmp_path)) == str(tmp_path / "step-10")  # numeric, not lexical, order


def test_load_state_rejects_other_world_size(tmp_path):
    _fake_state(tmp_path, "step-1", marker=True, world_size=2)
    d = dist_utils.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="world size 2"):
        checkpoint.load_state(str(tmp_path / "step-1"), None, None, dist=d)


def test_build_model_path_errors_name_the_path(tmp_path):
    d = dist_utils.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    kw = dict(init_config=None, dist=d, param_dtype=torch.float32, reduce_dtype=torch.float32,
              activation_checkpointing=False)
    with pytest.raises(FileNotFoundError, match=f"config.json in model path {tmp_path}"):
        mu.build_model(path=str(tmp_path), **kw)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"model.safetensors.* in model path {tmp_path}"):
        mu.build_model(path=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="exactly one"):
        mu.build_model(path=None, **kw)


def test_trim_response_keeps_eos_and_drops_padding():
    assert mu._trim_response([5, 6, 2, 0, 0], eos_id=2) == [5, 6, 2]
    assert mu._trim_response([5, 2, 2, 2], eos_id=2) == [5, 2]        # pad == eos (no pad token)
    assert mu._trim_response([5, 0, 7], eos_id=2) == [5, 0, 7]        # ran out of tokens: kept whole


def test_generation_chunks_respect_the_kv_budget():
    """rows x (longest prompt of the call + new tokens) <= budget; a row over the budget goes alone."""
    assert mu.generation_chunks([10, 10, 10, 10], 10, 40) == [slice(0, 2), slice(2, 4)]
    assert mu.generation_chunks([10, 30, 5], 10, 60) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert mu.generation_chunks([100], 10, 5) == [slice(0, 1)]
    assert mu.generation_chunks([3] * 7, 1, 2**62) == [slice(0, 7)]
    for lengths, new, budget in [([5, 9, 2, 7, 7, 1], 4, 30), ([1] * 9, 2, 6)]:
        chunks = mu.generation_chunks(lengths, new, budget)
        assert [i for c in chunks for i in range(len(lengths))[c]] == list(range(len(lengths)))
        assert all((c.stop - c.start) * (max(lengths[c]) + new) <= budget for c in chunks)


def test_setup_distributed_on_cuda_asks_for_a_group_that_serves_cpu_tensors_too(monkeypatch):
    """NCCL serves only CUDA tensors; on a GPU node the default group must also have a CPU (gloo) backend and
    the configured timeout. (Failed before: the group was plain "nccl" with NCCL's default timeout.)"""
    import datetime
    asked = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: asked.update(set_device=dev))
    monkeypatch.setattr(dist_utils.tdist, "init_process_group", lambda backend, **kw: asked.update(backend=backend, **kw))
    monkeypatch.setattr(dist_utils, "init_device_mesh", lambda device_type, shape: (device_type, shape))
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    d = dist_utils.setup_distributed(timeout_s=5400)
    assert set(asked["backend"].split(",")) == {"cpu:gloo", "cuda:nccl"}
    assert asked["device_id"] == torch.device("cuda", 3) == asked["set_device"] == d.device
    assert asked["timeout"] == datetime.timedelta(seconds=5400)
    assert (d.rank, d.world_size, d.mesh) == (3, 8, ("cuda", (8,)))


@pytest.mark.parametrize("nproc", [1, 2])
def test_packed_logprobs_match_padded_and_stay_inside_sequences(nproc, tmp_path):
    """One padding-free packed row per rank (sdpa and eager) gives the padded rows' log-probs, entropy and
    gradients, and changing one packed sequence leaves the others' log-probs exactly unchanged."""
    run_worker("packed", nproc, tmp_path)
