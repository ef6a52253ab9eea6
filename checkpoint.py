"""Resumable training state and atomic directory commits.

save_state writes the sharded model + optimizer (torch.distributed.checkpoint) and each rank's extra state and
RNG states (JSON + safetensors, no pickle) into ckpt/step-N.tmp, writes the COMPLETE marker and renames it to
ckpt/step-N: a checkpoint without the marker, or still *.tmp, is never taken (latest_state). load_state reshards
to the current model's layout; the per-rank state needs the same world size. train.async_save: the shards
are written in the background (dcp.async_save) and committed by the same marker and rename once written.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import safetensors.torch
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_utils import Dist

COMPLETE_MARKER = "COMPLETE"  # written inside step-N.tmp before the rename that commits a checkpoint


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move tmp to out_dir; an existing out_dir is moved aside first and deleted only afterwards."""
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {"python": [version, list(mt), gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _split_tensors(obj, tensors: dict, prefix: str):
    """JSON-able copy of obj with every tensor replaced by {"__tensor__": key} (tensor put in `tensors`)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


_PENDING: dict = {}  # the background save in flight (train.async_save): its future and what commits it
_SAVE_GROUP: list = []  # a gloo group of its own for the background writer's collectives (made once)


def save_state(ckpt_root: str, step: int, model, optimizer, extra: dict, *, dist: Dist, keep: int = 2,
               background: bool = False) -> str:
    """Sharded model + optimizer state (dcp.save) and per-rank `extra` + RNG states (rank<R>.json/.safetensors,
    no pickle) into ckpt_root/step-<N>.tmp; rank 0 then writes the COMPLETE marker and renames to step-<N>
    (the commit point) and deletes complete checkpoints beyond the newest `keep`. Returns the final path.
    background: dcp.async_save copies this rank's shards to host memory now (what is saved is this step's
    state, whatever training does next) and writes them in a thread on a gloo group of its own; the commit
    waits for wait_for_save (the next save, or the caller after its next step). Until then it stays *.tmp."""
    wait_for_save(dist)  # one save in flight at a time
    final = os.path.join(ckpt_root, f"step-{step}")
    tmp = final + ".tmp"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        os.makedirs(tmp)
    tdist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if background:
        if not _SAVE_GROUP:
            _SAVE_GROUP.append(tdist.new_group(backend="gloo"))  # (collective: every rank saves together)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                                process_group=_SAVE_GROUP[0])
    else:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        future = None
    tensors: dict[str, torch.Tensor] = {}
    rng_meta, rng_tensors = _rng_state()
    meta = {"extra": _split_tensors(extra, tensors, "extra"), "rng": rng_meta}
    tensors.update(rng_tensors)
    safetensors.torch.save_file(tensors, os.path.join(tmp, f"rank{dist.rank}.safetensors"))
    with open(os.path.join(tmp, f"rank{dist.rank}.json"), "w") as f:
        json.dump(meta, f)
    _PENDING.update(future=future, tmp=tmp, final=final, root=ckpt_root, step=step, keep=keep)
    if not background:
        wait_for_save(dist)
    return final


def wait_for_save(dist: Dist) -> None:
    """Commit the save in flight, if any: this rank's write done, a barrier, then rank 0's COMPLETE marker,
    the rename and the pruning. Collective when a save is pending (every rank has one then)."""
    if not _PENDING:
        return
    p = dict(_PENDING)
    _PENDING.clear()
    if p["future"] is not None:
        p["future"].result()  # (a failed background write raises here)
    tdist.barrier()
    if dist.rank == 0:
        with open(os.path.join(p["tmp"], COMPLETE_MARKER), "w") as f:
            json.dump({"step": p["step"], "world_size": dist.world_size}, f)
        replace_dir(p["tmp"], p["final"])  # the commit: one rename (a same-step final is moved aside, then deleted)
        complete = _complete_states(p["root"])
        for old in complete[:-p["keep"]] if p["keep"] > 0 else []:
            shutil.rmtree(old[1])
    tdist.barrier()


def _complete_states(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of committed checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = re.fullmatch(r"step-(\d+)", name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_state(ckpt_root: str) -> str | None:
    """Newest committed checkpoint dir under ckpt_root (never a *.tmp or one without the marker), or None."""
    complete = _complete_states(ckpt_root)
    return complete[-1][1] if complete else None


def load_state(path: str, model, optimizer, *, dist: Dist) -> dict:
    """Restore model + optimizer (resharded to this model's layout) and this rank's RNG states from a
    save_state dir; returns this rank's `extra` dict (tuples come back as lists)."""
    with open(os.path.join(path, COMPLETE_MARKER)) as f:
        saved_world = json.load(f)["world_size"]
    if saved_world != dist.world_size:
        raise ValueError(f"checkpoint {path} was saved with world size {saved_world}, "
                         f"this run has {dist.world_size}: per-rank sampler/RNG state cannot be mapped")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tensors = safetensors.torch.load_file(os.path.join(path, f"rank{dist.rank}.safetensors"))
    with open(os.path.join(path, f"rank{dist.rank}.json")) as f:
        meta = json.load(f)
    _set_rng_state(meta["rng"], tensors)
    return _join_tensors(meta["extra"], tensors)

