"""One tokenised copy of the questions a run trains on, per output_dir: made once by rank 0, memory-mapped by
every rank, reused at every restart (issue 27.2).

Layout of output_dir/tokens/ (written under tokens.tmp-<pid>/ and renamed: the rename is the commit):
    ids.npy          int32 [sum of sequence lengths]   every kept response's full ids (prompt + response + eot),
                                                       question after question, response after response
    offsets.npy      int64 [sequences + 1]             sequence s is ids[offsets[s]:offsets[s + 1]]
    meta.json        per question: its light record (data.read_records(index_only=True): id, gold, rewards, ...),
                     prompt_len, rewards of the kept responses; the dataset's report; the chosen indices; the
                     data lines the build read (`lines`) and the sha256 of their records (`texts_sha256`)
    fingerprint.json what the copy depends on (fingerprint()); a copy is used only when it matches

Host memory per rank is then the pages its own batches touch, not the corpus: the texts are never held, the
ids are a shared read-only mapping of one file (the page cache holds one copy per node, not one per rank).

What the copy depends on, and how it is checked without hashing the whole data file at each start:
  * the index (every record's light fields and line number: what the draw and the weights are computed from)
    and the draw's order, hashed from what the index pass already holds;
  * the tokenizer (vocabulary, special tokens, chat template) and data.max_len / overlong / group_size;
  * the texts of the records the build read (the drawn questions and the replacements it looked at): at reuse
    those lines alone are re-read and hashed (texts_sha256), so an edited response is seen.
A copy that does not match is recomputed before step 1 (one line says so) and refused after it (DataError:
the run has trained on the old tokens; its reference cache and sampler state were made from them).
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np

import data

DIR = "tokens"


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(path: str, index: list[dict], order: list[int], tokenizer, **dataset_kw) -> dict:
    """The inputs the token copy is a function of (besides the texts, checked by texts_sha256): the data file's
    size, the index records (light fields + line numbers), the draw's order over them, the tokenizer and the
    GroupDataset settings (group_size, max_len, overlong, end_of_turn)."""
    tok = [sorted(tokenizer.get_vocab().items()), tokenizer.chat_template,
           sorted(map(str, tokenizer.all_special_tokens))]
    return {"data_size": os.path.getsize(path), "index_sha256": _sha256(index), "order_sha256": _sha256(order),
            "tokenizer_sha256": _sha256(tok), "dataset": {k: dataset_kw[k] for k in sorted(dataset_kw)}}


def _texts_sha256(path: str, lines: list[int]) -> str:
    return _sha256(data.read_lines(path, lines))


def _write(out_dir: str, dataset, chosen: list[int], fp: dict, lines: list[int], texts_sha256: str) -> None:
    """dataset's items as ids.npy / offsets.npy / meta.json / fingerprint.json under a temporary name, renamed."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lengths = [len(s) for _, _, seqs, _ in dataset.items for s in seqs]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.lib.format.open_memmap(os.path.join(tmp, "ids.npy"), mode="w+", dtype=np.int32,
                                    shape=(int(offsets[-1]),))
    s = 0
    for _, _, seqs, _ in dataset.items:  # filled in place: no second copy of the corpus in memory
        for seq in seqs:
            ids[offsets[s]:offsets[s + 1]] = seq
            s += 1
    ids.flush()
    del ids
    np.save(os.path.join(tmp, "offsets.npy"), offsets)
    light = lambda rec: {k: v for k, v in rec.items() if k not in data.HEAVY_KEYS}  # noqa: E731
    meta = {"questions": [{"record": light(rec), "prompt_len": p, "rewards": r, "num": len(seqs)}
                          for rec, p, seqs, r in dataset.items],
            "report": dataset.report, "chosen": chosen, "lines": lines, "texts_sha256": texts_sha256}
    for name, obj in (("meta.json", meta), ("fingerprint.json", fp)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _read(out_dir: str, tokenizer, dataset_kw: dict):
    """(GroupDataset over memory-mapped ids, chosen) from a committed copy."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    ids = np.load(os.path.join(out_dir, "ids.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(out_dir, "offsets.npy"))
    dataset = data.GroupDataset([], tokenizer, **dataset_kw)
    items, s = [], 0
    for q in meta["questions"]:
        seqs = [ids[offsets[s + j]:offsets[s + j + 1]] for j in range(q["num"])]  # views into the mapping
        s += q["num"]
        items.append((q["record"], q["prompt_len"], seqs, q["rewards"]))
    dataset.items, dataset.report = items, meta["report"]
    return dataset, meta["chosen"]


def _decide(out_dir: str, fp: dict, path: str, resuming: bool) -> str:
    """"reuse" a committed copy made from these inputs, "build" one (none yet, or stale before step 1), or an
    error line (stale after step 1)."""
    saved = None
    if os.path.exists(os.path.join(out_dir, "fingerprint.json")):
        with open(os.path.join(out_dir, "fingerprint.json")) as f:
            saved = json.load(f)
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        if saved == fp and _texts_sha256(path, meta["lines"]) == meta["texts_sha256"]:
            return "reuse"
    changed = ("none" if saved is None else
               ", ".join(k for k in fp if saved.get(k) != fp[k]) or "the texts of its questions")
    if not resuming or saved is None:
        return "build" if saved is None else f"rebuild ({changed} changed)"
    return (f"error: {out_dir}: the token copy this run trained on was made from other inputs ({changed} "
            "changed); it cannot be remade once the policy moved: restore the data and tokenizer, or start a fresh "
            "output_dir")


def load_or_build(output_dir: str, build, fp: dict, path: str, tokenizer, dataset_kw: dict, *, rank: int,
                  resuming: bool, barrier=lambda: None, poll_s: float = 0.5):
    """The run's tokenised questions: (GroupDataset, chosen indices, "reused" | "built" | "rebuilt (...)").

    Rank 0 decides and, when needed, calls build() -> (dataset, chosen, lines read) and commits the copy; the
    other ranks wait for the commit by polling the file system (not a collective: tokenising a large corpus may
    outlast the collective timeout) and map it. A refusal is raised as DataError on every rank (rank 0 writes it
    to tokens.FAILED for the others). barrier(): one short collective, after rank 0 cleared the previous
    start's READY / FAILED marks, so no rank reads a mark of an earlier start."""
    out_dir = os.path.join(output_dir, DIR)
    failed, ready = out_dir + ".FAILED", os.path.join(out_dir, "READY")
    if rank == 0:
        for mark in (failed, ready):
            if os.path.exists(mark):
                os.remove(mark)
    barrier()
    if rank == 0:
        try:
            action = _decide(out_dir, fp, path, resuming)
            if action.startswith("error: "):
                raise data.DataError(action[len("error: "):])
            if action != "reuse":
                dataset, chosen, lines = build()
                _write(out_dir, dataset, chosen, fp, lines, _texts_sha256(path, lines))
        except data.DataError as e:
            with open(failed, "w") as f:
                f.write(str(e))
            raise
        with open(ready, "w") as f:  # this start's copy is committed
            f.write(str(os.getpid()))
    else:
        action = "reuse"
        while not os.path.exists(ready):  # (a file-system wait, see above)
            if os.path.exists(failed):
                with open(failed) as f:
                    raise data.DataError(f.read())
            time.sleep(poll_s)
    dataset, chosen = _read(out_dir, tokenizer, dataset_kw)
    return dataset, chosen, {"reuse": "reused", "build": "built"}.get(action, action.replace("rebuild", "rebuilt"))



def identity(output_dir: str) -> str:
    """sha256 of the committed token copy's fingerprint and the texts it was made from: what a cache computed
    from these tokens (reference.py's pre-pass) depends on."""
    out_dir = os.path.join(output_dir, DIR)
    with open(os.path.join(out_dir, "fingerprint.json")) as f:
        fp = json.load(f)
    with open(os.path.join(out_dir, "meta.json")) as f:
        texts = json.load(f)["texts_sha256"]
    return _sha256([fp, texts])
