"""eval.math's resumption: what produced an --out directory's samples (settings.json) and which problems
are finished (samples.jsonl). A resume with other settings, another model or other data is refused
(InputError, one line naming what changed); eval.math --restart starts the directory afresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eval.inputs import InputError, file_sha256, model_hash


def identity(model_dir, backend: str, data_path) -> dict:
    """What produced the samples, for settings.json: the model directory and inputs.model_hash of it, the
    backend, the data file and its sha256 (None where not known: a model object without a directory)."""
    return {"model": None if model_dir is None else os.path.abspath(model_dir),
            "model_hash": None if model_dir is None else model_hash(model_dir), "backend": backend,
            "data": None if data_path is None else os.path.abspath(data_path),
            "data_hash": None if data_path is None else file_sha256(data_path)}


def model_dir_of(model):
    """The local directory a HF model (name_or_path) or a vllm.LLM (its model_config.model) was loaded from."""
    path = getattr(model, "name_or_path", None)
    if path is None and hasattr(model, "llm_engine"):
        path = model.llm_engine.model_config.model
    return path if isinstance(path, str) and os.path.isdir(path) else None



def load_finished(samples_path: Path, n) -> dict[str, list[dict]]:
    """Problems with all their samples in samples.jsonl (n: the sample count, or the list of sample indices a
    shard holds); rewrites the file without any other lines (a partially written problem, or a torn last line
    after a crash)."""
    want = list(range(n)) if isinstance(n, int) else list(n)
    if not samples_path.exists():
        return {}
    by_id: dict[str, dict[int, dict]] = {}
    lines = samples_path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            s = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue  # torn last line
            raise InputError(f"{samples_path}:{i + 1}: not valid JSON ({e.msg}); only a torn last line is dropped "
                             "on resumption: repair the file or use another --out directory") from None
        if not isinstance(s, dict) or "id" not in s or "sample" not in s:
            raise InputError(f"{samples_path}:{i + 1}: not a sample record (id, sample, ...); repair the file or "
                             "use another --out directory")
        by_id.setdefault(s["id"], {})[s["sample"]] = s
    finished = {pid: [got[j] for j in want] for pid, got in by_id.items() if set(got) == set(want)}
    kept = [s for pid in finished for s in finished[pid]]
    if len(kept) != len(lines):
        samples_path.write_text("".join(json.dumps(s) + "\n" for s in kept))
    return finished


def check_settings(out_dir: Path, settings: dict, write: bool = True) -> None:
    """InputError when out_dir's settings.json holds other settings (or is not JSON); else write it (write=True)
    if it is not there yet."""
    path = out_dir / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e}); use another --out directory") from None
        if not isinstance(old, dict):
            raise InputError(f"{path}: expected a JSON object, got {type(old).__name__}; use another --out directory")
        if old != settings:
            diff = ", ".join(f"{k} changed" if k.endswith("_hash") and old.get(k) and settings[k] else
                             f"{k} {old.get(k)!r} (this run: {settings[k]!r})" for k in settings
                             if old.get(k) != settings[k])
            raise InputError(f"{out_dir} holds samples made with other settings: {diff}. Use another --out "
                             "directory, or --restart to start it afresh (its samples are deleted).")
    elif write:
        path.write_text(json.dumps(settings, indent=1) + "\n")
