"""exports.py and save_hf's gather: step exports pruned (a link's target spared), hf/final a link to the export
that holds the last step, an export of a step that exists skipped, save_hf gathering in the storage dtype."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import exports  # noqa: E402
from test_train import ENV, assert_same_weights, grpo_config, lab, metrics, run_train  # noqa: E402,F401


def _fake_export(root, name, step):
    os.makedirs(root / name)
    (root / name / "model.safetensors").write_text(name)
    (root / name / exports.EXPORT_MARKER).write_text(json.dumps({"step": step}))


def test_prune_keeps_the_newest_and_every_link_target(tmp_path):
    for s in (10, 20, 30, 40):
        _fake_export(tmp_path, f"step-{s}", s)
    exports.link("step-10", str(tmp_path / "best"))
    assert os.readlink(tmp_path / "best") == "step-10"  # relative
    assert exports.prune_steps(str(tmp_path), 2) == ["step-20"]  # step-10 is best's target
    assert sorted(os.listdir(tmp_path)) == ["best", "step-10", "step-30", "step-40"]
    assert exports.exported_step(str(tmp_path / "best")) == 10
    assert exports.prune_steps(str(tmp_path), 0) == []  # 0 keeps all
    # an older run's hf/best copy (a real directory) is replaced by the link, nothing left aside
    _fake_export(tmp_path, "final", 40)
    exports.link("step-40", str(tmp_path / "final"))
    assert os.path.islink(tmp_path / "final") and (tmp_path / "final" / "model.safetensors").read_text() == "step-40"
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".old"))]


def test_step_exports_pruned_final_linked_and_an_existing_step_skipped(lab):
    """hf_every=1, keep_hf=2 over 3 steps: hf/step-2, hf/step-3, hf/final -> step-3 (not a second copy), loadable
    with from_pretrained and equal to step-3. A resumed run that re-reaches step 3 skips its export."""
    from transformers import AutoModelForCausalLM
    cfg = grpo_config(lab, "x", hf_every=1, keep_hf=2, max_steps=3, save_every=1)
    out = run_train(lab["root"] / "exports", cfg, nproc=2)
    hf = out / "hf"
    assert sorted(os.listdir(hf)) == ["final", "step-2", "step-3"]
    assert os.path.islink(hf / "final") and os.readlink(hf / "final") == "step-3"
    assert exports.exported_step(str(hf / "final")) == 3
    AutoModelForCausalLM.from_pretrained(str(hf / "final"))
    stamp = os.stat(hf / "step-3" / "model.safetensors").st_mtime_ns
    os.rename(out / "ckpt" / "step-3", out / "ckpt" / "gone")  # resume from step 2: step 3 is re-run
    (out / "ckpt" / "gone" / "COMPLETE").unlink()
    run_train(out, cfg, nproc=2)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert os.stat(hf / "step-3" / "model.safetensors").st_mtime_ns == stamp  # skipped, not rewritten
    assert sorted(n for n in os.listdir(hf)) == ["final", "step-2", "step-3"]


SAVE_CHECK = r'''
import os, sys, torch
from torch.distributed.tensor import DTensor
import safetensors.torch
import dist_utils, model_utils as mu, synthetic
from transformers import AutoTokenizer
tmp = sys.argv[1]
d = dist_utils.setup_distributed()
if d.rank == 0:
    synthetic.build_tokenizer(tmp + "/tok")
torch.distributed.barrier()
tok = AutoTokenizer.from_pretrained(tmp + "/tok")
cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, dtype="bfloat16", tie_word_embeddings=True)
model = mu.build_model(path=None, init_config=cfg, dist=d, param_dtype=torch.float32, reduce_dtype=torch.float32,
                       activation_checkpointing=True, seed=1)
master = {n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor().clone() for n, p in model.named_parameters()}
gathered = []
full_tensor = DTensor.full_tensor
def spy(self, *a, **k):
    gathered.append(self.dtype)
    return full_tensor(self, *a, **k)
DTensor.full_tensor = spy
mu.save_hf(model, tok, tmp + "/hf", dist=d)
DTensor.full_tensor = full_tensor
assert gathered and set(gathered) == {torch.bfloat16}, gathered  # cast on the shard, gathered in bf16
if d.rank == 0:
    stored = safetensors.torch.load_file(tmp + "/hf/model.safetensors")
    assert stored.keys() == master.keys()  # (named_parameters lists a tied weight once; save_hf drops the alias)
    for n, t in stored.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, master[n].to(torch.bfloat16)), n
dist_utils.teardown_distributed()
'''


def test_save_hf_casts_on_the_shard_and_gathers_in_the_storage_dtype(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SAVE_CHECK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
