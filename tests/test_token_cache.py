"""token_cache: one tokenised copy per output_dir, equal to a fresh tokenisation, reused when its inputs match,
recomputed before step 1 and refused after it when they do not; the other ranks wait for rank 0's copy and map it
(issue 27.2). In-process on the tiny lab's data; the restart of a real run is tests/test_train.py's resume test."""
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import data
import token_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("tc")
    for cmd in (["synthetic.py", "--out", out], ["curate.py", "--input", out / "teacher_raw.jsonl", "--output",
                                                  out / "teacher.jsonl"]):
        subprocess.run([sys.executable, *map(str, cmd)], check=True, capture_output=True, cwd=ROOT)
    from transformers import AutoTokenizer
    return SimpleNamespace(path=out / "teacher.jsonl", tok=AutoTokenizer.from_pretrained(out / "tokenizer"))


KW = dict(group_size=8, max_len=384, overlong="truncate")


def draw(path, k=20, seed=3):
    index = data.read_records(path, index_only=True)
    return index, data.draw_order(len(index), k, seed=seed)


def builder(path, index, order, tok, k=20, calls=None):
    def build():
        if calls is not None:
            calls.append(1)
        ds, chosen = data.tokenise_drawn(path, index, order, k, tok, **KW)
        return ds, chosen, sorted(index[i]["_line"] for i in order[:k + ds.report["drawn_replaced"]])
    return build


def same_items(a, b):
    assert [x[0]["id"] for x in a.items] == [y[0]["id"] for y in b.items]
    for x, y in zip(a.items, b.items):
        assert x[0]["gold"] == y[0]["gold"] and x[1] == y[1] and list(x[3]) == list(y[3])
        assert len(x[2]) == len(y[2]) and all(np.array_equal(s, t) for s, t in zip(x[2], y[2]))
    assert all(a[i] == b[i] for i in range(len(a)))  # what the step reads (lists, masks, rewards, gold)


def test_copy_equals_a_fresh_tokenisation_and_is_reused(lab, tmp_path):
    index, order = draw(lab.path)
    fresh, chosen = data.tokenise_drawn(lab.path, index, order, 20, lab.tok, **KW)
    fp = token_cache.fingerprint(lab.path, index, order, lab.tok, **KW)
    calls = []
    build = builder(lab.path, index, order, lab.tok, calls=calls)
    got, got_chosen, how = token_cache.load_or_build(tmp_path, build, fp, lab.path, lab.tok, KW, rank=0,
                                                     resuming=False)
    assert how == "built" and got_chosen == chosen and calls == [1]
    same_items(got, fresh)
    again, _, how = token_cache.load_or_build(tmp_path, build, fp, lab.path, lab.tok, KW, rank=0, resuming=True)
    assert how == "reused" and calls == [1]  # no second tokenisation
    same_items(again, fresh)
    seq = again.items[0][2][0]
    assert isinstance(seq.base, np.memmap) or isinstance(seq, np.memmap)  # a view into the mapped file
    assert seq.dtype == np.int32
    assert again.report == json.loads(json.dumps(fresh.report))
    assert not list(tmp_path.glob("tokens.tmp-*"))  # committed by a rename


def test_stale_copy_is_rebuilt_before_step_1_and_refused_after(lab, tmp_path):
    path = tmp_path / "teacher.jsonl"
    lines = lab.path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines))
    index, order = draw(path)
    fp = token_cache.fingerprint(path, index, order, lab.tok, **KW)
    out = tmp_path / "run"
    token_cache.load_or_build(out, builder(path, index, order, lab.tok), fp, path, lab.tok, KW, rank=0,
                              resuming=False)
    # one drawn question's response edited, same length and index: only the texts' hash sees it
    used = json.loads((out / "tokens" / "meta.json").read_text())["lines"][0]
    rec = json.loads(lines[used - 1])
    rec["responses"][0] = rec["responses"][0][::-1]
    lines[used - 1] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    index2, order2 = draw(path)
    fp2 = token_cache.fingerprint(path, index2, order2, lab.tok, **KW)
    with pytest.raises(data.DataError, match=r"other inputs \(the texts of its questions changed\).*fresh output_dir"):
        token_cache.load_or_build(out, builder(path, index2, order2, lab.tok), fp2, path, lab.tok, KW, rank=0,
                                  resuming=True)
    got, _, how = token_cache.load_or_build(out, builder(path, index2, order2, lab.tok), fp2, path, lab.tok, KW,
                                            rank=0, resuming=False)
    assert how == "rebuilt (the texts of its questions changed)"
    same_items(got, data.tokenise_drawn(path, index2, order2, 20, lab.tok, **KW)[0])
    # another max_len: the settings are named
    kw = {**KW, "max_len": 256}
    fp3 = token_cache.fingerprint(path, index2, order2, lab.tok, **kw)
    with pytest.raises(data.DataError, match=r"\(dataset changed\)"):
        token_cache.load_or_build(out, lambda: None, fp3, path, lab.tok, kw, rank=0, resuming=True)
    # another chat template: the tokenizer is named
    import copy
    tok2 = copy.deepcopy(lab.tok)
    tok2.chat_template = lab.tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    fp4 = token_cache.fingerprint(path, index2, order2, tok2, **KW)
    with pytest.raises(data.DataError, match=r"\(tokenizer_sha256 changed\)"):
        token_cache.load_or_build(out, lambda: None, fp4, path, tok2, KW, rank=0, resuming=True)


def test_other_ranks_wait_for_rank_0_and_see_its_refusal(lab, tmp_path):
    index, order = draw(lab.path)
    fp = token_cache.fingerprint(lab.path, index, order, lab.tok, **KW)
    barrier = threading.Barrier(2)
    got = {}

    def rank1():
        try:
            got["r1"] = token_cache.load_or_build(tmp_path, lambda: 1 / 0, fp, lab.path, lab.tok, KW, rank=1,
                                                  resuming=False, barrier=barrier.wait, poll_s=0.01)
        except data.DataError as e:
            got["r1"] = e
    t = threading.Thread(target=rank1)
    t.start()
    r0 = token_cache.load_or_build(tmp_path, builder(lab.path, index, order, lab.tok), fp, lab.path, lab.tok, KW,
                                   rank=0, resuming=False, barrier=barrier.wait)
    t.join(60)
    same_items(got["r1"][0], r0[0])  # rank 1 never tokenised (its build would divide by zero)
    # a refusal on rank 0 reaches rank 1 as the same DataError
    fp2 = {**fp, "data_size": fp["data_size"] + 1}
    t = threading.Thread(target=lambda: got.update(r1=_catch(lambda: token_cache.load_or_build(
        tmp_path, None, fp2, lab.path, lab.tok, KW, rank=1, resuming=True, barrier=barrier.wait, poll_s=0.01))))
    t.start()
    with pytest.raises(data.DataError) as e0:
        token_cache.load_or_build(tmp_path, None, fp2, lab.path, lab.tok, KW, rank=0, resuming=True,
                                  barrier=barrier.wait)
    t.join(60)
    assert isinstance(got["r1"], data.DataError) and str(got["r1"]) == str(e0.value)
    assert "(data_size changed)" in str(e0.value)


def _catch(fn):
    try:
        return fn()
    except data.DataError as e:
        return e


def test_startup_benchmark_runs_and_its_modes_keep_the_same_tokens(tmp_path):
    """benchmarks/startup.py at a tiny size: the three start-up paths keep the same questions and tokens (the
    benchmark compares like with like); its bad numbers are one line."""
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "benchmarks/startup.py", "--questions", "12", "--draw", "4", "--words",
                           "30", "--vocab", "400", "--json", out], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["all_then_draw", "draw_first", "restart"]
    assert len({(r["questions_kept"], r["tokens_kept"]) for r in rows}) == 1 and rows[0]["questions_kept"] == 4
    bad = subprocess.run([sys.executable, "benchmarks/startup.py", "--questions", "3", "--draw", "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("startup.py: error: need 1 <= --draw (4)")
    assert len(bad.stderr.strip().splitlines()) == 1
