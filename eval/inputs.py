"""eval's inputs, checked: problem records (JSONL) and local HF model directories. InputError names the
file:line, key or value and what is valid; the command-line tools print it as one line (cli.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class InputError(ValueError):
    """Input eval.math refuses (the CLI prints it as one line): a bad data file, model directory or --out."""


def load_records(path, limit: int | None = None) -> list[dict]:
    """Records of a JSONL file (first `limit`), each with a string id (default: the 0-based line index).
    InputError naming file:line for a line that is not UTF-8 or not a JSON object, a record without a string
    "problem" or without "answer", and a duplicate id."""
    records, line_of = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            where = f"{path}:{line_no + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start + 1} of the line); the file must be UTF-8 "
                                 "JSONL") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one "
                                 "JSON object") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object with 'problem' and 'answer', got "
                                 f"{type(rec).__name__}")
            for key in ("problem", "answer"):
                if key not in rec:
                    raise InputError(f"{where}: the record has no {key!r} (a record needs 'problem' and 'answer')")
            if not isinstance(rec["problem"], str):
                raise InputError(f"{where}: 'problem' must be a string, got {type(rec['problem']).__name__}")
            rec["id"] = str(rec["id"]) if "id" in rec else str(line_no)
            if rec["id"] in line_of:
                raise InputError(f"{where}: duplicate id {rec['id']!r} (also at line {line_of[rec['id']]}); ids "
                                 "must be unique")
            line_of[rec["id"]] = line_no + 1
            records.append(rec)
            if limit is not None and len(records) == limit:
                break
    return records


def check_model_dir(path) -> dict:
    """The config.json of a local HF model directory; InputError unless the directory holds config.json (a
    JSON object), weights (one of WEIGHT_FILES) and a tokenizer (one of TOKENIZER_FILES)."""
    want = "give a local HF model directory with config.json, weights and a tokenizer"
    if not os.path.isdir(path):
        raise InputError(f"--model {path}: {'not a directory' if os.path.exists(path) else 'no such directory'} "
                         f"({want})")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"--model {path}: no config.json ({want})")
    try:
        config = json.loads(Path(config_path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{config_path}: not UTF-8 (byte {e.start + 1}); config.json must be a JSON object") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{config_path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise InputError(f"--model {path}: no weights (one of {', '.join(WEIGHT_FILES)})")
    if not any(os.path.isfile(os.path.join(path, t)) for t in TOKENIZER_FILES):
        raise InputError(f"--model {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return config


def max_positions(config: dict) -> int | None:
    """Positions (prompt + generated tokens) the model attends over: config.json's max_position_embeddings,
    times the factor of a yarn / linear / dynamic rope_scaling (from its original_max_position_embeddings
    when given); None when config.json has no max_position_embeddings."""
    n = config.get("max_position_embeddings")
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    rs = config.get("rope_scaling")
    if (isinstance(rs, dict) and (rs.get("rope_type") or rs.get("type")) in ("yarn", "linear", "dynamic")
            and isinstance(rs.get("factor"), (int, float))):
        n = int(rs.get("original_max_position_embeddings") or n) * rs["factor"]
    return int(n)



def file_sha256(path) -> str:
    """sha256 of a file's bytes (the --data file recorded in settings.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(model_dir, blocks: int = 16, block_size: int = 1 << 20) -> str:
    """sha256 naming a model directory's identity: config.json's bytes, and for every weight file (*.safetensors,
    *.bin, their *.index.json) its name, size and `blocks` evenly spaced blocks of `block_size` bytes (the whole
    file when it is smaller than that): cheap on a 15 GB 7B, and two trainings of one architecture differ in
    every block of tensor data even where names and sizes agree."""
    h = hashlib.sha256()
    d = Path(model_dir)
    h.update(b"config.json\0" + (d / "config.json").read_bytes())
    for f in sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".bin", ".index.json"))):
        size = f.stat().st_size
        h.update(f"\0{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= blocks * block_size:
                h.update(fh.read())
                continue
            for i in range(blocks):
                fh.seek(i * (size - block_size) // (blocks - 1))
                h.update(fh.read(block_size))
    return h.hexdigest()
