"""train.async_save: periodic saves written in the background by dcp.async_save, committed (COMPLETE marker and
rename) once written; a run resumed from such a checkpoint ends exactly as the run that saved in line."""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_train import assert_same_weights, grpo_config, lab, metrics, run_train  # noqa: E402,F401


def test_background_saves_commit_and_resume_exactly(lab):
    cfg = grpo_config(lab, "x", max_steps=5, save_every=1, keep_checkpoints=10)
    inline = run_train(lab["root"] / "inline", cfg, nproc=2)
    cfg["train"]["async_save"] = True
    part = lab["root"] / "async"
    run_train(part, cfg, nproc=2, extra=["train.stop_after=3"])
    # steps 1 and 2 written in the background and committed after the next step; step 3 (the stop) in line
    assert sorted(os.listdir(part / "ckpt")) == ["step-1", "step-2", "step-3"]
    assert all((part / "ckpt" / s / "COMPLETE").is_file() for s in ("step-1", "step-2"))
    shutil.rmtree(part / "ckpt" / "step-3")  # resume from a background-written state
    run_train(part, cfg, nproc=2)
    assert [m["step"] for m in metrics(part)] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(inline)]  # exact
    assert_same_weights(inline / "hf" / "final", part / "hf" / "final", atol=0)
