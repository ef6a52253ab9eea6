"""synthetic.py: problems, traces, simulated teacher, process reward, tokenizer, CLI files."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic as syn

REPO = Path(__file__).resolve().parents[1]


def boxed(text):
    return re.findall(r"\\boxed\{(\d+)\}", text)[-1]


def reference_value(problem, overrides=None):
    """Independent evaluator: resolve assignments from the *question text* until the target is known."""
    m = int(re.match(r"Mod (\d+):", problem.question).group(1))
    body = problem.question.split(": ", 1)[1].rsplit(". Find ", 1)[0]
    assigns = dict(a.split("=") for a in body.split(", "))
    vals = {}
    while len(vals) < len(assigns):
        for var, expr in assigns.items():
            x, op, y = re.fullmatch(r"(\w+)([-+*])(\w+)", expr).groups()
            if var in vals or not all(t.isdigit() or t in vals for t in (x, y)):
                continue
            a, b = (int(t) if t.isdigit() else vals[t] for t in (x, y))
            vals[var] = {"+": a + b, "-": a - b, "*": a * b}[op] % m
            if overrides and var in overrides:
                vals[var] = overrides[var]
    return vals[problem.target]


def test_correct_trace_answer_matches_dag():
    for seed in range(100):
        rng = random.Random(seed)
        for k in range(1, 9):
            for modulus, ordered in ((5, True), (7, False), (23, True)):
                p = syn.make_problem(rng, k, modulus, ordered_names=ordered)
                assert p.k == k == len(p.steps)
                assert int(boxed(syn.correct_trace(p))) == p.answer == reference_value(p)
                # with no error probability the teacher writes the correct trace
                assert syn.teacher_trace(p, rng, 0.0) == syn.correct_trace(p)


def test_question_lists_every_assignment_once():
    rng = random.Random(1)
    for k in range(1, 10):
        p = syn.make_problem(rng, k, 7)
        body = p.question.split(": ", 1)[1].rsplit(". Find ", 1)[0]
        listed = sorted(body.split(", "))
        assert listed == sorted(f"{v}={a}{op}{b}" for v, op, a, b in p.steps)
        assert p.question.endswith(f"Find {p.target}.")


def test_injected_error_changes_answer_and_propagates():
    changed = total = 0
    for seed in range(200):
        rng = random.Random(seed)
        p = syn.make_problem(rng, rng.randint(1, 6), 7)
        var = rng.choice(p.steps)[0]
        bad = (p.values[var] + rng.randrange(1, 7)) % 7
        trace = syn.render_trace(p, {var: bad})
        expected = reference_value(p, {var: bad})  # the error propagates to later steps
        assert int(boxed(trace)) == expected
        total += 1
        changed += expected != p.answer
        if var == p.target:  # the target step itself: always a different answer
            assert expected != p.answer
    # every node is an ancestor of the target; only x*0-type cancellations can hide an error
    assert changed / total > 0.75


def test_teacher_traces_errors_grow_with_k():
    rng = random.Random(0)
    acc = {}
    for k in (1, 4):
        hits = []
        for _ in range(200):
            p = syn.make_problem(rng, k, 7)
            hits += [boxed(t) == str(p.answer) for t in syn.teacher_traces(p, rng, 16, syn.p_step_error(k))]
        acc[k] = sum(hits) / len(hits)
    assert acc[1] > acc[4]


def test_process_reward():
    rng = random.Random(3)
    for _ in range(50):
        p = syn.make_problem(rng, rng.randint(2, 6), 7)
        assert syn.process_reward(p, syn.correct_trace(p)) == (1.0, True)
        var = p.steps[0][0]
        bad = syn.render_trace(p, {var: (p.values[var] + 1) % 7})
        frac, strict = syn.process_reward(p, bad)
        assert frac < 1.0 and not strict
        lines = syn.correct_trace(p).split("\n")
        missing = "\n".join(lines[:2] + lines[3:])  # drop the second step
        assert syn.process_reward(p, missing) == ((p.k - 1) / p.k, False)
        duplicated = "\n".join(lines[:2] + lines[1:])  # first step twice
        assert syn.process_reward(p, duplicated)[0] < 1.0
    for garbage in ("", "Define", "Define .", "Define x=.", "Define q=1+2=zz.", "\\boxed{", "<think>Define a==="):
        frac, strict = syn.process_reward(p, garbage)
        assert frac < 1.0 and strict is False


def test_problem_dict_round_trip():
    rng = random.Random(5)
    for k in (1, 3, 7):
        p = syn.make_problem(rng, k, 11)
        d = json.loads(json.dumps(p.to_dict()))
        q = syn.Problem.from_dict(d)
        assert q == p and q.question == p.question and q.answer == p.answer


def _tree_digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """`python synthetic.py` twice, in parallel, under different string-hash seeds."""
    outs, procs = [], []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        out = tmp_path_factory.mktemp(name)
        args = [sys.executable, str(REPO / "synthetic.py"), "--out", str(out), "--n-mid", "60",
                "--mid-k", "1-3", "--mid-weights", "3,2,1", "--n-teacher", "10", "--n-eval", "20"]
        procs.append(subprocess.Popen(args, cwd=out, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs.append(out)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    return outs


def test_cli_deterministic_and_schemas(small_data):
    a, b = small_data
    assert _tree_digest(a) == _tree_digest(b)
    assert {f.name for f in a.iterdir()} >= {"tokenizer", "mid.jsonl", "teacher_raw.jsonl",
                                              "eval_id.jsonl", "eval_ood.jsonl", "eval_mid.jsonl"}
    mid = [json.loads(line) for line in open(a / "mid.jsonl")]
    assert len(mid) == 60
    assert sorted(r["difficulty"] for r in mid) == [1] * 30 + [2] * 20 + [3] * 10  # exact --mid-weights shares
    for r in mid:
        assert set(r) == {"id", "question", "responses", "rewards", "gold", "agreement", "all_positive",
                          "difficulty", "source", "dag"}
        p = syn.Problem.from_dict(r["dag"])
        assert r["question"] == p.question and r["responses"] == [syn.correct_trace(p)]
        assert r["rewards"] == [1.0] and r["gold"] == str(p.answer) and r["difficulty"] == p.k
    rows = [json.loads(line) for line in open(a / "teacher_raw.jsonl")]
    assert len(rows) == 10 * 16
    for r in rows:
        assert set(r) == {"conversations", "domain", "source", "difficulty", "dag"}
        (h, g) = r["conversations"]
        assert h["from"] == "human" and g["from"] == "gpt" and r["domain"] == "math"
        assert h["value"] == syn.Problem.from_dict(r["dag"]).question and "\\boxed{" in g["value"]
    assert len({r["conversations"][0]["value"] for r in rows}) == 10
    for name in ("eval_id", "eval_ood", "eval_mid"):
        recs = [json.loads(line) for line in open(a / f"{name}.jsonl")]
        assert len(recs) == 20
        for r in recs:
            assert set(r) == {"id", "problem", "answer", "dag", "k"}
            p = syn.Problem.from_dict(r["dag"])
            assert r["problem"] == p.question and r["answer"] == str(p.answer) and r["k"] == p.k
    # eval questions never appear in training data; mid-training never sees a teacher question
    mid_q, teacher_q = {r["question"] for r in mid}, {r["conversations"][0]["value"] for r in rows}
    eval_q = {json.loads(line)["problem"] for n in ("eval_id", "eval_ood") for line in open(a / f"{n}.jsonl")}
    assert not (mid_q | teacher_q) & eval_q and not mid_q & teacher_q
    # the retention set (eval_mid): k = 2, held out from every training set and from the other evals
    ret = [json.loads(line) for line in open(a / "eval_mid.jsonl")]
    assert {r["k"] for r in ret} == {2} and len({r["problem"] for r in ret}) == 20
    assert not {r["problem"] for r in ret} & (mid_q | teacher_q | eval_q)


def test_eval_mid_leaves_every_other_file_as_it_was(small_data, tmp_path):
    """eval_mid is drawn last from an rng of its own: with it asked for k = 3 instead, every other file is the same
    (the lab's data, and so its table, did not move when the retention set was added)."""
    a, _ = small_data
    args = [sys.executable, str(REPO / "synthetic.py"), "--out", str(tmp_path), "--n-mid", "60", "--mid-k", "1-3",
            "--mid-weights", "3,2,1", "--n-teacher", "10", "--n-eval", "20", "--eval-mid-k", "3"]
    subprocess.run(args, check=True, capture_output=True, cwd=tmp_path)
    for name in ("mid.jsonl", "teacher_raw.jsonl", "eval_id.jsonl", "eval_ood.jsonl"):
        assert (tmp_path / name).read_bytes() == (a / name).read_bytes(), name
    assert (tmp_path / "eval_mid.jsonl").read_bytes() != (a / "eval_mid.jsonl").read_bytes()


def test_tokenizer(small_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_data[0] / "tokenizer"))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok) <= syn.VOCAB_SIZE
    p = syn.make_problem(random.Random(0), 4, 7)
    msgs = [{"role": "user", "content": p.question}, {"role": "assistant", "content": syn.correct_trace(p)}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (f"<|im_start|>user\n{p.question}<|im_end|>\n"
                    f"<|im_start|>assistant\n{syn.correct_trace(p)}<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    # the added tokens are single ids; every other character is one id
    for t in syn.ADDED_TOKENS + syn.SPECIAL_TOKENS:
        assert len(tok(t)["input_ids"]) == 1
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True).count("<think>") == 1


def test_tokenizer_survives_being_saved_next_to_a_qwen2_model(tmp_path):
    """AutoTokenizer loads a directory with a qwen2 config.json as Qwen2Tokenizer, which rebuilds the byte-level
    pre-tokenizer; the exported tiny models must still tokenise exactly as in training (spaces, newlines)."""
    from transformers import AutoTokenizer, Qwen2Config
    plain = syn.build_tokenizer(tmp_path)
    Qwen2Config(vocab_size=syn.VOCAB_SIZE, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    as_model = AutoTokenizer.from_pretrained(tmp_path)
    p = syn.make_problem(random.Random(0), 3, 7)
    chat = [{"role": "user", "content": p.question}, {"role": "assistant", "content": syn.correct_trace(p)}]
    text = plain.apply_chat_template(chat, tokenize=False)
    assert as_model(text, add_special_tokens=False)["input_ids"] == plain(text, add_special_tokens=False)["input_ids"]
    assert as_model.decode(as_model(text, add_special_tokens=False)["input_ids"]) == text
