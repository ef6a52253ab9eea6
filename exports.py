"""A run's HF exports under <output_dir>/hf: each step's weights written once, everything else a link.

    hf/step-N    every train.hf_every steps; only the newest train.keep_hf are kept (0: all), never a link's target
    hf/epoch-N   after a validation (sampling.validate_epoch)
    hf/best      a relative symlink to the best epoch's export (best.json says which)
    hf/final     a relative symlink to the export that already holds the last step, else written

Every written export gets export.json {"step": N} after its commit (model_utils.save_hf: out.tmp -> out): a
directory without it holds no known step and is rewritten. export() skips a name that already holds its step
(a resumed run reaching that step again has the same weights: resume is exact) and links a name to another
export of the same step instead of writing the 15 GB twice (7B bf16). Rank 0 decides; every rank follows.
"""
import json
import os
import re
import shutil

import torch.distributed as tdist

import model_utils as mu

EXPORT_MARKER = "export.json"  # {"step": N}: the training step whose weights the directory holds


def exported_step(path: str) -> int | None:
    """The step an export (or the export a link points to) holds, or None (absent, torn, not yet marked)."""
    try:
        with open(os.path.join(path, EXPORT_MARKER)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(path: str) -> None:
    """Delete a link (never what it points to), a file or a directory; nothing if absent."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def link(target_name: str, link_path: str) -> None:
    """link_path -> target_name (a sibling, relative: the run directory can move), committed by one rename;
    a directory there (an older copy) is moved aside first and deleted after."""
    tmp, old = link_path + ".tmp", link_path + ".old"
    remove(tmp)
    os.symlink(target_name, tmp)
    if os.path.isdir(link_path) and not os.path.islink(link_path):
        remove(old)
        os.rename(link_path, old)
    os.replace(tmp, link_path)
    remove(old)


def _holder(hf_root: str, step: int, name: str) -> str | None:
    """Another written (not linked) export under hf_root that holds `step`, the newest name first."""
    if not os.path.isdir(hf_root):
        return None
    for other in sorted(os.listdir(hf_root), reverse=True):
        path = os.path.join(hf_root, other)
        if (other != name and not other.endswith((".tmp", ".old")) and not os.path.islink(path)
                and os.path.isdir(path) and exported_step(path) == step):
            return other
    return None


def prune_steps(hf_root: str, keep: int) -> list[str]:
    """Delete hf/step-N beyond the newest `keep` (0: keep all), sparing any link's target. Returns the deleted."""
    if keep <= 0 or not os.path.isdir(hf_root):
        return []
    names = os.listdir(hf_root)
    steps = sorted((int(m.group(1)), n) for n in names if (m := re.fullmatch(r"step-(\d+)", n))
                   and not os.path.islink(os.path.join(hf_root, n)))
    targets = {os.path.realpath(os.path.join(hf_root, n)) for n in names if os.path.islink(os.path.join(hf_root, n))}
    gone = [n for _, n in steps[:-keep] if os.path.realpath(os.path.join(hf_root, n)) not in targets]
    for n in gone:
        remove(os.path.join(hf_root, n))
    return gone


def export(model, tokenizer, hf_root: str, name: str, step: int, *, dist, keep_steps: int = 0) -> str:
    """hf_root/name holding the weights of `step`: skipped when it already does, a link to another export of
    that step when one exists, else written (model_utils.save_hf, collective) and marked; then hf/step-N beyond
    the newest keep_steps are pruned. Every rank calls it. Returns the path."""
    out = os.path.join(hf_root, name)
    decision = [None]
    if dist.rank == 0:
        os.makedirs(hf_root, exist_ok=True)
        if exported_step(out) == step:
            decision[0] = "skip"
        else:
            decision[0] = _holder(hf_root, step, name) or "write"
    tdist.broadcast_object_list(decision, src=0)
    if decision[0] == "write":
        if dist.rank == 0 and os.path.islink(out):
            os.unlink(out)  # a link from an earlier run: write a directory in its place, not through it
        mu.save_hf(model, tokenizer, out, dist=dist)
        if dist.rank == 0:
            with open(os.path.join(out, EXPORT_MARKER + ".tmp"), "w") as f:
                json.dump({"step": step}, f)
            os.replace(os.path.join(out, EXPORT_MARKER + ".tmp"), os.path.join(out, EXPORT_MARKER))
    elif decision[0] != "skip" and dist.rank == 0:
        link(decision[0], out)
    if dist.rank == 0:
        prune_steps(hf_root, keep_steps)
    tdist.barrier()
    return out
