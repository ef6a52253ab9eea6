"""Tests for curate.py: parsing, majority-vote pooling, drops,
seeded group selection, the report, malformed-line abort, majority accuracy on the synthetic task."""
import json

import pytest

import curate
import synthetic
from data import read_records
from reward import answers_equivalent, extract_answer, majority_vote


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


# --------------------------------------------------------------------------- fixtures

def ot3(question, response, *, domain="math", roles=("from", "human", "gpt", "value"), **extra):
    k, u, a, v = roles
    row = {"conversations": [{k: u, v: question}, {k: a, v: response}], "source": "fixture", "difficulty": 3,
           **extra}
    if domain is not None:
        row["domain"] = domain
    return row


def boxed(ans):
    return f"<think>\nwork {ans}\n</think>\nSo \\boxed{{{ans}}}."


CLEAN = ["4"] * 10 + ["4.0"] * 2 + ["5"] * 2 + [None] * 2  # majority 12/16 = 0.75 (4 == 4.0)


def clean_response(i, ans):
    return f"attempt {i}: " + (boxed(ans) if ans else "no box")


def fixture_rows():
    """Questions (16 rows each unless noted) and malformed lines; returns (rows, expectations)."""
    rows = []
    rows += [ot3("Clean: 2 + 2?", clean_response(i, a)) for i, a in enumerate(CLEAN)]
    rows += [ot3("Tie?", boxed(str(1 + i % 2))) for i in range(16)]
    rows += [ot3("No box?", f"I think it is {i}") for i in range(16)]
    rows += [ot3("Low  agreement?", boxed(a)) for a in "aaaaaabbbbccc" + "ddd"]  # 6/16 < 0.5
    rows += [ot3("Few?", boxed("7")) for _ in range(5)]
    rows += [ot3("Roles: 3 + 3?", boxed("6") + f" v{i}", domain=None, roles=("role", "user", "assistant", "content"))
             for i in range(16)]
    rows += [ot3(f"Filler {q}?", boxed(str(q)) + f" #{i}") for q in range(20) for i in range(16)]
    rows.append(ot3("Code?", boxed("1"), domain="code"))
    rows.insert(30, b"{this is not json\n")
    rows.insert(60, b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n')  # latin-1 byte
    rows.insert(90, ot3("Clean: 2 + 2?", "   "))
    rows.insert(120, {"conversations": [{"from": "human", "value": "only a question"}], "domain": "math"})
    return rows


def run_curate(tmp_path, rows, name="raw.jsonl", **kw):
    inp = write_jsonl(tmp_path / name, rows)
    out = tmp_path / (name + ".out.jsonl")
    report = curate.curate([str(inp)], str(out), **kw)
    return report, {r["question"]: r for r in read_records(out)}, out


def test_curate_fixture(tmp_path):
    rows = fixture_rows()
    report, recs, out = run_curate(tmp_path, rows, group_size=8, min_agreement=0.5, seed=0)
    assert report["rows_read"] == len(rows) == 16 * 25 + 5 + 1 + 4
    assert report["rows_malformed"] == 4 and report["rows_not_math"] == 1 and report["rows_no_domain"] == 16
    assert {r: e["count"] for r, e in report["malformed"].items()} == {
        "bad_json": 1, "non_utf8": 1, "empty_response": 1, "missing_turns": 1}
    assert report["malformed"]["bad_json"]["first"].endswith("raw.jsonl:31")
    assert report["malformed"]["non_utf8"]["first"].endswith("raw.jsonl:61")
    assert report["questions_read"] == 26 and report["questions_kept"] == 22
    assert report["dropped"] == {"too_few_samples": 1, "no_boxed_answer": 1, "tie": 1, "low_agreement": 1}
    assert set(recs) == {"Clean: 2 + 2?", "Roles: 3 + 3?"} | {f"Filler {q}?" for q in range(20)}
    clean = recs["Clean: 2 + 2?"]
    assert answers_equivalent(clean["gold"], "4") and clean["agreement"] == 0.75
    assert len(clean["responses"]) == 8 == len(set(clean["responses"]))
    assert set(clean["responses"]) <= {clean_response(i, a) for i, a in enumerate(CLEAN)}
    expected = [float(answers_equivalent(extract_answer(r), "4")) for r in clean["responses"]]
    assert clean["rewards"] == expected and clean["all_positive"] == all(expected)
    assert clean["difficulty"] == 3 and clean["source"] == "fixture" and "dag" not in clean
    roles = recs["Roles: 3 + 3?"]
    assert roles["gold"] == "6" and roles["rewards"] == [1.0] * 8 and roles["all_positive"]
    n_pos = sum(r["all_positive"] for r in recs.values())
    assert report["all_positive_share"] == pytest.approx(n_pos / 22) and n_pos >= 21
    hist = report["agreement_histogram"]
    assert hist["[0.7,0.8)"] == 1 and hist["[0.3,0.4)"] == 1 and hist["[0.9,1.0]"] == 21 and sum(hist.values()) == 23
    assert json.loads(open(f"{out}.report.json").read()) == json.loads(json.dumps(report))
    # deterministic given seed and question, not file order (and a parquet copy reads the same)
    shuffled = [r for r in rows if isinstance(r, dict)][::-1]
    _, recs2, _ = run_curate(tmp_path, shuffled, name="rev.jsonl", group_size=8, min_agreement=0.5, seed=0)
    assert recs2 == recs
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = [r for r in rows if isinstance(r, dict) and r.get("domain") == "math" and r["conversations"][-1]["from"] == "gpt"]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "raw.parquet")
    rep3 = curate.curate([str(tmp_path / "raw.parquet")], str(tmp_path / "pq.jsonl"), group_size=8, seed=0)
    assert rep3["questions_kept"] == 21 and rep3["rows_malformed"] == 1  # the whitespace-only response
    assert {r["question"]: r for r in read_records(tmp_path / "pq.jsonl")}["Clean: 2 + 2?"] == clean
    _, recs4, _ = run_curate(tmp_path, rows, name="s1.jsonl", group_size=8, seed=1)
    assert recs4["Clean: 2 + 2?"]["responses"] != clean["responses"]  # another seed, another subset


def test_curate_aborts_over_one_percent(tmp_path, capsys):
    rows = [ot3(f"Q{q}?", boxed("1")) for q in range(6) for _ in range(16)] + [b"\xff{\n", b"[1, 2]\n"]
    inp = write_jsonl(tmp_path / "bad.jsonl", rows)  # 2 / 98 > 1%
    with pytest.raises(SystemExit) as e:
        curate.main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("curate.py: error: ") and err.count("\n") == 1 and "2/98 lines malformed" in err
    assert "non_utf8 x1 (first at" in err and "bad.jsonl:97" in err and "not_object x1" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_curate_synthetic_majority_accuracy(tmp_path):
    import random
    rng = random.Random(0)
    p1, p2 = synthetic.make_problem(rng, 2, 7), synthetic.make_problem(rng, 3, 7)
    wrong1, wrong2 = str((p1.answer + 1) % 7), str((p2.answer + 1) % 7)
    rows = [ot3(p1.question, boxed(a), dag=p1.to_dict()) for a in [str(p1.answer)] * 12 + [wrong1] * 4]
    rows += [ot3(p2.question, boxed(a), dag=p2.to_dict()) for a in [str(p2.answer)] * 6 + [wrong2] * 10]
    report, recs, _ = run_curate(tmp_path, rows, group_size=4, min_agreement=0.6, workers=2)
    assert report["majority_accuracy"] == {"voted": 0.5, "kept": 0.5}
    assert recs[p1.question]["dag"] == p1.to_dict() and recs[p2.question]["gold"] == wrong2
    assert recs[p2.question]["agreement"] == 0.625


def test_curation_votes_on_the_joined_boxes(tmp_path):
    """16 teacher rows: 6 box the two roots separately, 4 box them together (other order), 6 say 3. Joined, the
    roots win 10 to 6; read by the last box alone it was a 6 : 6 tie and the question was dropped."""
    texts = (["<think>\nroots \\boxed{7}?\n</think>\nx = \\boxed{1} and x = \\boxed{-2}"] * 6
             + ["<think>\nroots\n</think>\n\\boxed{-2, 1}"] * 4 + ["<think>\nhm\n</think>\n\\boxed{3}"] * 6)
    rows = [{"conversations": [{"from": "human", "value": "Solve x^2 + x - 2 = 0."},
                               {"from": "gpt", "value": t + f" ({i})"}], "domain": "math"} for i, t in enumerate(texts)]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = curate.curate([str(tmp_path / "raw.jsonl")], str(tmp_path / "out.jsonl"), group_size=8, seed=0)
    (rec,) = read_records(tmp_path / "out.jsonl")
    assert report["questions_kept"] == 1 and rec["agreement"] == 10 / 16
    assert answers_equivalent(rec["gold"], "1,-2")
    assert rec["rewards"] == [0.0 if r.startswith("<think>\nhm") else 1.0 for r in rec["responses"]]
    old = majority_vote([extract_answer(t) for t in texts])
    assert old == (None, [0.0] * 16)  # the last box alone: -2 x 6 vs 3 x 6


def test_a_killed_worker_fails_the_run_instead_of_hanging(tmp_path):
    """A voting worker SIGKILLed mid-run (the OOM killer): curate.py stops with one line, exit 1, nothing
    written (multiprocessing.Pool.map waited forever here)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    rows = [ot3(f"Q{q}?", boxed("KILL" if q == 5 else "1")) for q in range(12) for _ in range(8)]
    inp = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{repo / 'tests'}")
    proc = subprocess.run([sys.executable, str(repo / "tests" / "_curate_kill_worker.py"), "--input", str(inp),
                           "--output", str(out), "--workers", "2"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("curate.py: error: a voting worker died") and "--workers" in lines[0]
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists() and not Path(f"{out}.report.json").exists()
    # the same run without the kill: all 12 questions kept
    proc = subprocess.run([sys.executable, "curate.py", "--input", str(inp), "--output", str(out), "--workers", "2"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(Path(f"{out}.report.json").read_text())["questions_kept"] == 12


def test_degenerate_answers_stay_within_the_grading_budget(tmp_path):
    """A group whose answers include 9^{9^{9}}, a huge factorial and 2,000 nested braces: compared as strings only
    (counted in the report), the vote takes well under one math-verify timeout (before: ~10 s per comparison
    of 9^{9^{9}} with each other answer, 20 s for this group); the labels are those of a vote without them."""
    import time

    import reward
    junk = [r"9^{9^{9}}", r"100000!", "{" * 2000 + "1" + "}" * 2000]
    answers = ["12"] * 9 + [r"\frac{24}{2}"] + ["13"] * 3 + junk
    rows = [ot3("Q?", boxed(a) + f" ({i})") for i, a in enumerate(answers)]
    start = time.monotonic()
    report, recs, _ = run_curate(tmp_path, rows, group_size=8, workers=1)
    assert time.monotonic() - start < 5
    (rec,) = recs.values()
    assert rec["agreement"] == 10 / 16 and answers_equivalent(rec["gold"], "12")
    assert report["comparisons_string_only"] >= 3 and report["votes_over_budget"] == 0
    assert rec["rewards"] == [float(answers_equivalent(extract_answer(r), "12")) for r in rec["responses"]]
    assert reward.majority_vote(answers[:13] + [None] * 3)[0] == rec["gold"]  # the vote without the junk
    # the vote's time budget: past it, string comparisons only (counted); equal strings still agree
    before = reward.STATS["over_budget"]
    assert reward.majority_vote(["0.5", r"\frac12", "0.5"], budget_seconds=0.0) == ("0.5", [1.0, 0.0, 1.0])
    assert reward.majority_vote(["0.5", r"\frac12", "0.5"], budget_seconds=None) == ("0.5", [1.0, 1.0, 1.0])
    assert reward.STATS["over_budget"] - before == 2


def test_second_pass_memory_is_bounded_whatever_the_row_order(tmp_path):
    """200 questions x 16 rows of ~4 KB: the same records from grouped and shuffled files, and the shuffled
    file's peak (tracemalloc) stays far below the 6.4 MB of kept responses that the second pass used to hold
    until each question's last row (measured before: 4.5 MB of 4.8 for 2 KB rows, grouped 1.5)."""
    import random
    import tracemalloc
    rows = [ot3(f"Q{q}?", boxed(str(q % 7)) + f" #{i} " + "x" * 4000) for q in range(200) for i in range(16)]
    peaks, recs, orders = {}, {}, {}
    for name, rs in [("grouped", rows), ("shuffled", random.Random(0).sample(rows, len(rows)))]:
        inp, out = write_jsonl(tmp_path / f"{name}.jsonl", rs), tmp_path / f"{name}.out.jsonl"
        tracemalloc.start()
        curate.curate([str(inp)], str(out), group_size=8)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        recs[name] = {r["question"]: r for r in read_records(out)}
        orders[name] = list(recs[name])
    assert recs["grouped"] == recs["shuffled"] and len(recs["grouped"]) == 200
    assert orders["grouped"] == [f"Q{q}?" for q in range(200)]  # contiguous groups: the input's order, as before
    kept_bytes = sum(len(r) for rec in recs["grouped"].values() for r in rec["responses"])
    assert kept_bytes > 6_400_000 and peaks["shuffled"] < kept_bytes / 3, (peaks, kept_bytes)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # the spill file is gone


def test_prepare_openthoughts_limit_counts_questions_wherever_their_rows_are(tmp_path):
    """--limit 3 on a stream of 6 questions x 16 shuffled rows (and code rows): every row of the first 3 distinct
    questions, in stream order, and no more of the stream read than until the third is complete; curation of
    the result keeps 3 whole questions (the old row count, 48 rows, held pieces of 6)."""
    import importlib.util
    import random
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "prepare_openthoughts", Path(__file__).resolve().parents[1] / "launch" / "prepare_openthoughts.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    rows = [ot3(f"Q{q}?", boxed(str(q)) + f" #{i}") for q in range(6) for i in range(16)]
    rows += [ot3("Code?", boxed("1"), domain="code")] * 5
    rows = random.Random(1).sample(rows, len(rows))
    read = []
    stream = (read.append(r) or r for r in rows)
    got = list(prep.keep_questions(stream, 3))
    first3 = list(dict.fromkeys(r["conversations"][0]["value"] for r in rows if r["domain"] == "math"))[:3]
    want = [r for r in rows if r["domain"] == "math" and r["conversations"][0]["value"] in first3]
    assert got == want and len(got) == 48
    assert len(read) == 1 + max(i for i, r in enumerate(rows) if r in want) < len(rows)
    assert len(list(prep.keep_questions(iter(rows), None))) == 96  # no limit: every math row, in order
    report, recs, _ = run_curate(tmp_path, got, group_size=8)
    assert set(recs) == set(first3) and report["dropped"]["too_few_samples"] == 0
    report, _, _ = run_curate(tmp_path, [r for r in rows if r["domain"] == "math"][:48], name="old.jsonl")
    assert report["questions_read"] == 6 and report["dropped"]["too_few_samples"] >= 1  # pieces of every question
