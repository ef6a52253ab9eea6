"""Tests for data.py: reading curated records, sampling weights, tokenisation mask, collate, draw_questions,
GroupSampler. (Curation: tests/test_curate.py.)"""
import json

import numpy as np
import pytest
import torch

import synthetic
from data import DataError, GroupDataset, GroupSampler, collate, draw_questions, read_records, sampling_weights


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("tok")
    synthetic.build_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def record(i, responses, rewards, agreement=1.0, difficulty=None):
    return {"id": f"q{i}", "question": f"What is {i} + {i}?", "responses": responses, "rewards": rewards,
            "gold": str(2 * i), "agreement": agreement, "all_positive": all(r > 0 for r in rewards),
            "difficulty": difficulty, "source": "test"}


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


# --------------------------------------------------------------------------- read_records

def test_read_records_skips_and_aborts(tmp_path):
    good = [record(i, ["a"], [1.0]) for i in range(200)]
    bad = [b"{not json\n", b"\xff\xfe\n", (json.dumps({**record(999, ["a"], [1.0]), "rewards": [1, 0]}) + "\n").encode()]
    path = write_jsonl(tmp_path / "ok.jsonl", good[:50] + bad[:2] + good[50:100])  # 2/102 > 1%
    with pytest.raises(DataError, match=r"2/102 lines malformed .*bad_json x1 \(first at .*ok.jsonl:51\), "
                                         r"non_utf8 x1 \(first at .*ok.jsonl:52\)"):
        read_records(path)
    path = write_jsonl(tmp_path / "ok2.jsonl", good + bad[2:] + [b"\n"])  # 1/201 <= 1%, blank line ignored
    recs = read_records(path)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(200)]


# --------------------------------------------------------------------------- sampling_weights

def test_sampling_weights_rule():
    recs = [record(0, ["a"], [1.0], agreement=0.5, difficulty=3),
            record(1, ["a"], [1.0], agreement=0.8, difficulty=None),
            record(2, ["a"], [1.0], agreement=1.0, difficulty=7),
            record(3, ["a"], [1.0], agreement=0.74, difficulty=5)]
    aw = {"0.5": 1.0, 0.75: 2.0, "1.0": 0.5}
    w = sampling_weights(recs, agreement_weights=aw, difficulty_weights={3: 3.0, "7": 10.0})
    assert w == [3.0, 2.0, 5.0, 1.0]  # difficulty 5 unlisted, None -> factor 1
    rates = {"q0": 0.0, "q1": 0.5, "q2": 0.95, "q3": 0.1}
    w = sampling_weights(recs, agreement_weights=None, difficulty_weights=None, pass_rates=rates,
                         pass_rate_band=(0.2, 0.9))
    assert w == pytest.approx([0.8, 0.5, 0.0, 0.8])  # below low -> 1 - low; >= high -> 0; else 1 - rate
    w = sampling_weights(recs, agreement_weights=None, difficulty_weights=None, pass_rates={"q1": 1.0})
    assert w == pytest.approx([1.0, 0.0, 1.0, 1.0])  # missing ids = rate 0
    with pytest.raises(DataError, match="below every bucket"):
        sampling_weights(recs, agreement_weights={0.6: 1.0}, difficulty_weights=None)
    with pytest.raises(DataError, match="none of the question ids"):
        sampling_weights(recs, agreement_weights=None, difficulty_weights=None, pass_rates={"zz": 0.5})


# --------------------------------------------------------------------------- GroupDataset / collate

def test_group_dataset_mask_and_drops(tokenizer):
    eot = "<|im_end|>"
    recs = [record(0, ["Think. \\boxed{0}", "x" * 60, "short \\boxed{1}", "third"], [1.0, 0.0, 0.0, 1.0]),
            record(1, ["y" * 60, "ok", "z" * 70], [0.0, 1.0, 1.0]),
            record(2, ["r1", "r2"], [1.0, 0.0])]
    ds = GroupDataset(recs, tokenizer, group_size=2, max_len=60, overlong="drop")
    assert len(ds) == 2 and [r["id"] for r in ds.records] == ["q0", "q2"]
    assert ds.report == {"questions_in": 3, "questions_kept": 2, "questions_dropped_too_few_fit": 1,
                         "responses_in": 9, "responses_dropped_too_long": 3, "responses_truncated": 0,
                         "responses_dropped_prompt_too_long": 0}
    item = ds[0]
    assert item["rewards"] == [1.0, 0.0] and item["question_id"] == "q0" and item["gold"] == "0"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": recs[0]["question"]}],
                                           add_generation_prompt=True, tokenize=True)["input_ids"]
    assert item["prompt_ids"] == list(prompt)
    for ids, mask, resp in zip(item["input_ids"], item["loss_mask"], ["Think. \\boxed{0}", "short \\boxed{1}"]):
        assert len(ids) == len(mask) and ids[:len(prompt)] == list(prompt)
        masked = [t for t, m in zip(ids, mask) if m]
        assert tokenizer.decode(masked) == resp + eot  # exactly the response + end-of-turn, no trailing "\n"
        assert all(m == 0 for m in mask[:len(prompt)]) and all(m == 1 for m in mask[len(prompt):])
        assert tokenizer.decode(ids) == tokenizer.decode(prompt) + resp + eot
    # q0 kept its 1st and 3rd responses (the 2nd is too long); q1 has only 1 fitting response -> dropped
    assert ds[1]["question_id"] == "q2" and ds[1]["rewards"] == [1.0, 0.0]


def test_overlong_traces_are_truncated_by_default(tokenizer):
    """truncate: the first max_len tokens, loss on the kept response tokens, reward unchanged, counted; a prompt
    that leaves no response token is dropped and counted; drop keeps the old rule; anything else is refused."""
    long = "step " * 40 + "\\boxed{2}"
    recs = [record(1, ["ok \\boxed{2}", long, "fine"], [1.0, 1.0, 0.0])]
    ds = GroupDataset(recs, tokenizer, group_size=3, max_len=60)
    assert len(ds) == 1 and ds.report["responses_truncated"] == 1 and ds.report["responses_dropped_too_long"] == 0
    item = ds[0]
    assert item["rewards"] == [1.0, 1.0, 0.0]  # graded on the whole trace
    prompt = item["prompt_ids"]
    ids, mask = item["input_ids"][1], item["loss_mask"][1]
    assert len(ids) == len(mask) == 60
    assert mask == [0] * len(prompt) + [1] * (60 - len(prompt))
    full = tokenizer.apply_chat_template([[{"role": "user", "content": recs[0]["question"]},
                                           {"role": "assistant", "content": long}]], tokenize=True)["input_ids"][0]
    assert ids == list(full[:60])  # the trace's first max_len tokens, no end-of-turn
    dropped = GroupDataset(recs, tokenizer, group_size=3, max_len=60, overlong="drop")
    assert len(dropped) == 0 and dropped.report["responses_dropped_too_long"] == 1
    tiny = GroupDataset(recs, tokenizer, group_size=1, max_len=len(prompt))  # no room for any response token
    assert len(tiny) == 0 and tiny.report["responses_dropped_prompt_too_long"] == 3
    with pytest.raises(ValueError, match="overlong must be truncate or drop"):
        GroupDataset(recs, tokenizer, group_size=1, max_len=60, overlong="cut")


def test_collate_shapes_and_alignment(tokenizer):
    recs = [record(0, ["a", "bbbb"], [1.0, 0.0]), record(11, ["cc", "d"], [0.0, 1.0])]
    ds = GroupDataset(recs, tokenizer, group_size=2, max_len=100)
    items = [ds[0], ds[1]]
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    rows = [ids for it in items for ids in it["input_ids"]]
    masks = [m for it in items for m in it["loss_mask"]]
    T = max(map(len, rows))
    assert batch["input_ids"].shape == (4, T) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0]
    for b, (ids, m) in enumerate(zip(rows, masks)):
        assert batch["input_ids"][b, :len(ids)].tolist() == ids
        assert (batch["input_ids"][b, len(ids):] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * len(ids) + [0] * (T - len(ids))
        assert batch["loss_mask"][b].tolist() == [float(x) for x in m] + [0.0] * (T - len(ids))


# --------------------------------------------------------------------------- draw_questions

def test_draw_questions_subset():
    weights = [float(w) for w in range(10)]  # question i has weight i; question 0 can never be drawn
    d = draw_questions(10, 3, seed=5, weights=weights)
    assert len(set(d)) == 3 and d == sorted(d) and all(isinstance(i, int) and 1 <= i <= 9 for i in d)
    assert draw_questions(10, 3, seed=5, weights=weights) == d  # same seed, same subset (no rank involved)
    assert any(draw_questions(10, 3, seed=s, weights=weights) != d for s in range(6, 9))
    freq = np.zeros(10)
    for seed in range(2000):
        freq[draw_questions(10, 3, seed=seed, weights=weights)] += 1 / 2000
    assert freq[0] == 0 and freq.sum() == pytest.approx(3)
    assert freq[8] > freq[1] + 0.3  # about 0.49 vs 0.08
    assert all(freq[i + 1] > freq[i] - 0.03 for i in range(9))  # rises with the weight (sampling noise ~0.01)
    freq = np.zeros(10)
    for seed in range(2000):
        freq[draw_questions(10, 3, seed=seed)] += 1 / 2000
    np.testing.assert_allclose(freq, 0.3, atol=0.05)  # None = uniform
    assert sorted(draw_questions(4, 4, seed=0)) == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"num_questions 9 not in \[1, 8\]"):
        draw_questions(10, 9, seed=0, weights=[0.0, 0.0] + [1.0] * 8)
    with pytest.raises(DataError, match=r"num_questions 11 not in \[1, 10\]"):
        draw_questions(10, 11, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        draw_questions(3, 1, seed=0, weights=[1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- GroupSampler

def test_sampler_shards_resume_and_epochs():
    one = GroupSampler(10, 4, rank=0, world_size=1, seed=3)
    two = [GroupSampler(10, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(6):  # 24 draws = 2.4 epochs: steps cross epoch boundaries
        full = one.next_step()
        a, b = (s.next_step() for s in two)
        assert not set(a) & set(b) or len(set(full)) < 4  # disjoint unless the step spans an epoch repeat
        assert sorted(a + b) == sorted(full) and full[0::2] == a and full[1::2] == b
        seen.extend(full)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert one.epoch == 2 and one.position == 4 and one.progress == pytest.approx(2.4)
    # resume: a fresh sampler loaded with the state continues with the identical sequence
    state = one.state_dict()
    expected = [one.next_step() for _ in range(5)]
    fresh = GroupSampler(10, 4, rank=0, world_size=1, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert [fresh.next_step() for _ in range(5)] == expected
    other_seed = GroupSampler(10, 4, rank=0, world_size=1, seed=4)
    assert [other_seed.next_step() for _ in range(3)] != seen[:12]


def test_sampler_weighted():
    n = 6
    weights = [0.0, 1.0, 1.0, 2.0, 8.0, 0.0]
    s = GroupSampler(n, 1, rank=0, world_size=1, seed=0, weights=weights)
    first = np.zeros(n)
    for _ in range(4000):  # 1000 epochs of the 4 positive-weight questions
        draws = [s.next_step()[0] for _ in range(4)]
        assert sorted(draws) == [1, 2, 3, 4]  # weight 0 never drawn; an epoch holds each positive once
        first[draws[0]] += 1
        if s.epoch >= 1000:
            break
    p_first = first / first.sum()  # P(first) of a weighted draw without replacement = w / sum(w)
    np.testing.assert_allclose(p_first[[1, 2, 3, 4]], np.array([1, 1, 2, 8]) / 12, atol=0.04)
    with pytest.raises(ValueError):
        GroupSampler(3, 2, rank=0, world_size=1, seed=0, weights=[0, 0, 0])
    with pytest.raises(ValueError):
        GroupSampler(3, 3, rank=0, world_size=2, seed=0)


# --------------------------------------------------------------------------- draw before tokenising (issue 27)

def todays_draw(path, tokenizer, k, seed, **kw):
    """The code path before issue 27: tokenise every question, then draw among the kept ones."""
    from data import sampling_weights as sw
    ds = GroupDataset(read_records(path), tokenizer, **kw)
    weights = sw(ds.records, agreement_weights={0.0: 1.0, 0.75: 3.0}, difficulty_weights=None)
    ds.keep(draw_questions(len(ds), k, seed=seed, weights=weights))
    return ds


def new_draw(path, tokenizer, k, seed, **kw):
    from data import draw_order, tokenise_drawn
    index = read_records(path, index_only=True)
    assert all("responses" not in r and "question" not in r for r in index)
    weights = sampling_weights(index, agreement_weights={0.0: 1.0, 0.75: 3.0}, difficulty_weights=None)
    order = draw_order(len(index), k, seed=seed, weights=weights)
    return tokenise_drawn(path, index, order, k, tokenizer, **kw), order, weights


def test_draw_before_tokenising_equals_todays_subset(tokenizer, tmp_path):
    rows = [record(i, [f"<think>{'x ' * (i % 5)}</think> {2 * i}"] * 3, [1.0, 0.0, 1.0], agreement=(i % 4) / 4)
            for i in range(60)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    kw = dict(group_size=3, max_len=256)
    for seed in (0, 1, 7):
        old = todays_draw(path, tokenizer, 20, seed, **kw)
        (new, chosen), _, _ = new_draw(path, tokenizer, 20, seed, **kw)
        assert [it[0]["id"] for it in new.items] == [it[0]["id"] for it in old.items]
        for a, b in zip(new.items, old.items):
            assert a[1] == b[1] and a[3] == b[3] and all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))
        assert new.report["drawn_replaced"] == 0 and new.report["questions_in"] == 20  # only the drawn read


def test_unusable_drawn_questions_are_replaced_by_the_next_in_order(tokenizer, tmp_path):
    long = "<think>" + "y " * 400 + "</think> 1"
    rows = [record(i, ["<think>a</think> 1", long if i % 3 == 0 else "<think>b</think> 2"], [1.0, 0.0],
                   agreement=0.5 + (i % 2) / 2) for i in range(40)]
    rows[5] = record(5, ["<think>a</think> 1"], [1.0])  # one response only: passed over unread
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    kw = dict(group_size=2, max_len=64, overlong="drop")
    (new, chosen), order, _ = new_draw(path, tokenizer, 10, 3, **kw)
    # independent reference: tokenise everything, the usable ones; the first 10 usable of the draw's order
    usable = {it[0]["id"] for it in GroupDataset(read_records(path), tokenizer, **kw).items}
    first = [i for i in order if f"q{i}" in usable][:10]
    assert chosen == sorted(first) and [it[0]["id"] for it in new.items] == [f"q{i}" for i in sorted(first)]
    assert new.report["drawn_replaced"] == order.index(first[-1]) + 1 - 10 > 0
    assert len(new) == 10


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """The tiny lab's curated file and tokenizer, made as launch/demo.sh makes them."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("tinylab")
    for cmd in (["synthetic.py", "--out", out], ["curate.py", "--input", out / "teacher_raw.jsonl", "--output",
                                                  out / "teacher.jsonl"]):
        subprocess.run([sys.executable, *map(str, cmd)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("config", ["bias05", "offgrpo", "sft", "onpolicy", "krafton_code"])
def test_tiny_lab_subset_unchanged_on_1_and_2_ranks(tiny_lab, tmp_path, config):
    """build_data's subset and token groups (draw first, tokenise the drawn) equal the tokenise-all-then-draw
    path of before, for the tiny lab's configs and world sizes 1 and 2: the lab's table does not move."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import train
    cfg = train.load_config(f"configs/tiny/{config}.yaml", [f"data.train_path={tiny_lab / 'teacher.jsonl'}",
                                                          f"output_dir={tmp_path}"], check_paths=False)
    if not cfg.data.num_questions:
        pytest.skip(f"{config} draws no subset")
    tok = AutoTokenizer.from_pretrained(tiny_lab / "tokenizer")
    kw = dict(group_size=cfg.data.group_size, max_len=cfg.data.max_len, overlong=cfg.data.overlong)
    old = GroupDataset(read_records(cfg.data.train_path), tok, **kw)
    weights = None
    if cfg.data.agreement_weights or cfg.data.difficulty_weights:
        weights = sampling_weights(old.records, agreement_weights=cfg.data.agreement_weights,
                                   difficulty_weights=cfg.data.difficulty_weights)
    old.keep(draw_questions(len(old), cfg.data.num_questions, seed=cfg.train.seed, weights=weights))
    for world in (1, 2):
        new, _, _ = train.build_data(cfg, SimpleNamespace(rank=0, world_size=world), tok)
        assert [it[0]["id"] for it in new.items] == [it[0]["id"] for it in old.items]
        assert all(a[1] == b[1] and a[3] == b[3] and all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))
                   for a, b in zip(new.items, old.items))
        assert new.report["questions_in"] == cfg.data.num_questions < len(read_records(cfg.data.train_path))
