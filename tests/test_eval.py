"""eval/: metrics against hand computations and brute force, evaluate() on a scripted model, the CLI
end to end on a tiny random Qwen2 (with resumption), and the results table."""

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import synthetic
from eval import math as eval_math
from eval import table
from eval.metrics import avg_at_n, maj_at_k, pass_at_k, powers_of_two, summarize

REPO = Path(__file__).resolve().parents[1]


# --- metrics ------------------------------------------------------------------------------------

def test_pass_at_k_hand_cases():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every 3-subset holds a correct sample
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)  # samples 0..c-1 correct
                assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12), (n, c, k)


def test_avg_at_n_and_powers():
    assert avg_at_n([[True, False], [True, True, True, False]]) == pytest.approx((0.5 + 0.75) / 2)
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two(6) == [1, 2, 4]


def test_maj_at_k_on_written_answers():
    answers = [r"\frac12", "3", "0.5", None, "3", "3"]
    assert maj_at_k(answers, "1/2", 1) == 1.0
    assert maj_at_k(answers, "1/2", 2) == 0.0  # 1 vs 1: a tie is wrong
    assert maj_at_k(answers, "1/2", 4) == 1.0  # {1/2, 0.5} beat {3}; None does not vote
    assert maj_at_k(answers, "1/2", 6) == 0.0  # 3 wins
    assert maj_at_k(answers, "3", 6) == 1.0
    assert maj_at_k([None, None], "3", 2) == 0.0


def _rec(pid, s, correct, answer, gold="1", length=10, truncated=False, **extra):
    return dict(id=pid, sample=s, correct=correct, answer=answer, gold=gold, length=length,
                truncated=truncated, **extra)


def test_summarize_written_records():
    samples = [_rec("a", 0, True, "1", k=1), _rec("a", 1, False, "2", length=30, truncated=True, k=1),
               _rec("b", 1, True, "1.0", k=2), _rec("b", 0, True, "1", k=2),
               _rec("c", 0, False, "2", k=2), _rec("c", 1, False, None, k=2)]
    s = summarize(samples)
    assert (s["problems"], s["n"]) == (3, 2)
    assert s["avg@n"] == pytest.approx(100 * (0.5 + 1 + 0) / 3, abs=1e-3)
    assert s["pass@1"] == pytest.approx(s["avg@n"], abs=1e-3)
    assert s["pass@2"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert s["maj@n"] == pytest.approx(100 / 3, abs=1e-3)  # a: tie, b: right, c: "2" wins, wrong
    assert s["mean_length"] == pytest.approx(80 / 6, abs=1e-3)
    assert s["truncated"] == pytest.approx(100 / 6, abs=1e-3)
    assert "process_acc" not in s
    assert s["by_k"]["1"]["avg@n"] == 50.0 and s["by_k"]["2"]["avg@n"] == 50.0
    assert s["by_k"]["2"]["pass@2"] == 50.0 and s["by_k"]["2"]["problems"] == 2
    with pytest.raises(ValueError):
        summarize(samples[:-1])  # problem c has one sample, the others two


# --- evaluate() on a scripted model -------------------------------------------------------------

class ScriptedModel:
    """Stands in for a HF causal LM: generate() answers each prompt with the next scripted response of
    the problem it contains, followed by the end-of-turn token (cut at max_new_tokens)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self.tok, self.queues = tokenizer, {p: list(r) for p, r in scripts.items()}
        self.device = torch.device("cpu")
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    def generate(self, input_ids, attention_mask, generation_config):
        m = generation_config.max_new_tokens
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids)
            problem = next(p for p in self.queues if p in prompt)
            new = self.tok(self.queues[problem].pop(0), add_special_tokens=False)["input_ids"]
            new = (new + [self.tok.eos_token_id])[:m]
            rows.append(ids.tolist() + new + [self.tok.pad_token_id] * (m - len(new)))
        return torch.tensor(rows)


def _problems(seed=0, ks=(1, 2, 2)):
    rng = random.Random(seed)
    return [synthetic.make_problem(rng, k, 7) for k in ks]


def _records(problems):
    return [{"id": f"p{i}", "problem": p.question, "answer": str(p.answer), "dag": p.to_dict(), "k": p.k}
            for i, p in enumerate(problems)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return synthetic.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_evaluate_grades_and_summarises(tokenizer, tmp_path):
    a, b, c = problems = _problems()
    good = {p.question: synthetic.correct_trace(p) for p in problems}
    wrong_box = re.sub(r"\\boxed\{\d+\}$", r"\\boxed{%d}" % ((a.answer + 1) % 7), good[a.question])
    bad_step = re.sub(r"=(\d+)\.$", lambda m: f"={(int(m.group(1)) + 1) % 7}.", good[b.question],
                      count=1, flags=re.M)  # first step's value wrong, final answer still right
    assert synthetic.process_reward(b, bad_step)[1] is False and synthetic.process_reward(a, wrong_box)[1]
    scripts = {a.question: [good[a.question], wrong_box], b.question: [good[b.question], bad_step],
               c.question: ["x" * 100, r"\boxed{}"]}
    model = ScriptedModel(tokenizer, scripts)
    s = eval_math.evaluate(model, tokenizer, _records(problems), n=2, temperature=0.6, top_p=0.95,
                           max_new_tokens=64, batch_size=4, out_dir=tmp_path, instruction="")
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(x["id"], x["sample"], x["correct"]) for x in lines] == [
        ("p0", 0, True), ("p0", 1, False), ("p1", 0, True), ("p1", 1, True), ("p2", 0, False), ("p2", 1, False)]
    assert lines[0]["text"] == good[a.question] and lines[0]["answer"] == str(a.answer)
    assert lines[0]["length"] == len(tokenizer(good[a.question], add_special_tokens=False)["input_ids"]) + 1
    assert [x["truncated"] for x in lines] == [False, False, False, False, True, False]
    assert lines[4]["length"] == 64 and lines[5]["answer"] is None
    assert s == json.loads((tmp_path / "summary.json").read_text())
    assert s["avg@n"] == 50.0 and s["pass@2"] == pytest.approx(200 / 3, abs=1e-3)
    assert s["maj@n"] == pytest.approx(100 / 3, abs=1e-3)  # p0 ties 1:1 -> wrong; p1 right; p2 none
    assert s["process_acc"] == pytest.approx(100 * 2 / 6, abs=1e-3)  # right answer AND right steps
    assert s["truncated"] == pytest.approx(100 / 6, abs=1e-3)
    assert s["by_k"]["1"]["problems"] == 1 and s["by_k"]["2"]["pass@2"] == 50.0


# --- end to end on a tiny random Qwen2 ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = synthetic.build_tokenizer(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=synthetic.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    with open(d / "data.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in _records(_problems())))
    return d


def test_evaluate_is_seeded(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    recs = eval_math.load_records(tiny_model_dir / "data.jsonl", limit=2)

    def texts(out, seed, temperature):
        eval_math.evaluate(model, tok, recs, n=2, temperature=temperature, top_p=0.95, max_new_tokens=6,
                           batch_size=4, out_dir=tmp_path / out, seed=seed)
        return [json.loads(x)["text"] for x in (tmp_path / out / "samples.jsonl").read_text().splitlines()]

    assert texts("a", 0, 1.0) == texts("b", 0, 1.0)
    assert texts("a2", 1, 1.0) != texts("a", 0, 1.0)
    greedy = texts("g", 0, 0.0)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]  # temperature 0: both samples identical
    with pytest.raises(ValueError, match="another --out"):  # resuming with other settings is refused
        texts("a", 0, 0.5)


def test_cli_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "data.jsonl"), "--n", "2",
            "--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "8", "--out", str(out),
            "--batch-size", "3", "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "eval.math", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = out / "samples.jsonl"
    first = samples.read_text()
    lines = [json.loads(x) for x in first.splitlines()]
    assert sorted((x["id"], x["sample"]) for x in lines) == [(f"p{i}", s) for i in range(3) for s in range(2)]
    assert all(1 <= x["length"] <= 8 for x in lines) and all(x["length"] == 8 for x in lines if x["truncated"])
    assert {"process_frac", "process_ok", "k", "gold", "answer"} <= set(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["problems"], summary["n"]) == (3, 2)
    assert {"avg@n", "pass@1", "pass@2", "maj@n", "mean_length", "truncated", "process_acc"} <= set(summary)
    assert set(summary["by_k"]) == {"1", "2"}
    assert summary["mean_length"] == pytest.approx(sum(x["length"] for x in lines) / 6, abs=1e-3)

    # run again: everything is done, nothing is generated or written
    capsys.readouterr()
    eval_math.main(args)
    assert "3 of 3 problems already done" in capsys.readouterr().out
    assert samples.read_text() == first

    # drop p1 except one of its samples (a partial problem): only p1 is generated again
    kept = [x for x in first.splitlines() if json.loads(x)["id"] != "p1"]
    partial = next(x for x in first.splitlines() if json.loads(x)["id"] == "p1")
    samples.write_text("\n".join(kept[:2] + [partial] + kept[2:]) + "\n")
    eval_math.main(args)
    assert "2 of 3 problems already done, 1 to generate (2 samples)" in capsys.readouterr().out
    now = samples.read_text().splitlines()
    assert now[:4] == kept  # finished problems untouched, in place
    assert [(json.loads(x)["id"], json.loads(x)["sample"]) for x in now[4:]] == [("p1", 0), ("p1", 1)]


def test_cli_several_models_in_one_process(tiny_model_dir, tmp_path):
    from transformers import Qwen2ForCausalLM

    other = tmp_path / "other"  # the same architecture and tokenizer, other weights
    shutil.copytree(tiny_model_dir, other)
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2ForCausalLM.config_class.from_pretrained(tiny_model_dir)).save_pretrained(other)
    common = ["--data", str(tiny_model_dir / "data.jsonl"), "--n", "2", "--temperature", "1.0",
              "--max-new-tokens", "8", "--batch-size", "4", "--seed", "3"]
    both = eval_math.main(["--model", str(tiny_model_dir), str(other),
                           "--out", str(tmp_path / "a"), str(tmp_path / "b"), *common])
    alone = eval_math.main(["--model", str(other), "--out", str(tmp_path / "b_alone"), *common])
    texts = lambda d: [json.loads(x)["text"] for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
    assert texts("b") == texts("b_alone") and texts("a") != texts("b")  # as if each model ran on its own
    assert both[1] == alone[0] and (tmp_path / "a" / "summary.json").exists()
    with pytest.raises(SystemExit):  # one --out per --model
        eval_math.main(["--model", str(tiny_model_dir), str(other), "--out", str(tmp_path / "c"), *common])


# --- table --------------------------------------------------------------------------------------

def test_table_markdown_and_json(tmp_path, capsys):
    def put(rel, value):
        p = tmp_path / "runs" / rel / "summary.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"avg@n": value, "maj@n": value + 1}))

    put("base/aime24", 10.0)
    put("base/math500", 50.0)
    put("bias05/aime24/seed0", 20.0)
    put("bias05/aime24/seed1", 30.0)
    put("offgrpo/math500", 60.0)
    md = tmp_path / "results.md"
    table.main([str(tmp_path / "runs"), "--out", str(md), "--json", str(tmp_path / "r.json")])
    assert md.read_text() == (
        "avg@n (%)\n\n"
        "| Model | aime24 | math500 | Avg. |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| base | 10.0 | 50.0 | 30.0 |\n"
        "| bias05 | 25.0 ± 7.1 | – | – |\n"
        "| offgrpo | – | 60.0 | – |\n")
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["bias05"]["aime24"]["values"] == [20.0, 30.0] and js["bias05"]["aime24"]["seeds"] == 2
    assert js["bias05"]["aime24"]["std"] == pytest.approx(50 ** 0.5)
    assert js["base"]["Avg."] == {"mean": 30.0} and "Avg." not in js["bias05"]  # only for complete rows
    printed = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "results.png").exists()
    except ImportError:
        assert "bar chart skipped: matplotlib is not installed" in printed
    table.main([str(tmp_path / "runs" / "base"), "--out", str(md), "--metric", "maj@n"])
    assert "| base | 11.0 | 51.0 | 31.0 |" in md.read_text()


def _summary(path: Path, **values):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(values))


def test_table_rows_from_the_readme_layout(tmp_path):
    """runs/<model>/eval/<benchmark>/: one row per model (not one row "eval" averaging the models); the tiny
    lab's runs/tiny/eval/<variant>/<benchmark>/seed<S>/ one row per variant."""
    runs = tmp_path / "runs"
    _summary(runs / "base" / "eval" / "aime25_i", **{"avg@n": 55.0})
    _summary(runs / "bias05" / "eval" / "aime25_i", **{"avg@n": 56.6})
    _summary(runs / "bias05" / "eval" / "amc23", **{"avg@n": 80.0})
    _summary(runs / "tiny" / "eval" / "sft" / "eval_id" / "seed0", **{"avg@n": 40.0})
    _summary(runs / "tiny" / "eval" / "sft" / "eval_id" / "seed1", **{"avg@n": 50.0})
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "eval.table", str(runs), str(runs / "base"), "--out", str(md),
                           "--json", str(js)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(js.read_text())
    assert list(stats) == ["base", "bias05", "sft"]  # base named twice (runs/ and runs/base) counts once
    assert stats["base"]["aime25_i"]["values"] == [55.0] and stats["bias05"]["aime25_i"]["values"] == [56.6]
    assert stats["sft"]["eval_id"]["values"] == [40.0, 50.0]
    assert "| base | 55.0 | – | – |" in md.read_text()
    # README's own command: python -m eval.table runs/bias05/eval
    assert table.collect([runs / "bias05" / "eval"], "avg@n") == {"bias05": {"aime25_i": [56.6], "amc23": [80.0]}}


@pytest.mark.parametrize("first, second", [
    ("a/base/eval/aime", "b/base/eval/aime"),  # two runs directories, same model name
    ("base/aime", "base/aime/seed0"),  # a cell with and without seeds
    ("a/base/aime/seed0", "b/base/aime/seed1"),  # seeds of two different cell directories
])
def test_table_refuses_two_summaries_claiming_one_cell(tmp_path, first, second):
    _summary(tmp_path / "runs" / first, **{"avg@n": 1.0})
    _summary(tmp_path / "runs" / second, **{"avg@n": 2.0})
    md = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, "-m", "eval.table", str(tmp_path / "runs"), "--out", str(md)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not md.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.table: error: ") and "both claim row 'base'" in lines[0]


def _eval_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "eval.math", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_resume_with_another_model_or_data_is_refused(tiny_model_dir, tmp_path):
    """evaluate() with model A into --out, then the CLI with model B (same architecture and sizes, other weights),
    with A's directory holding new weights, and with another data file: each refused in one line naming what
    changed, nothing written; --restart starts afresh with B's own samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2ForCausalLM.config_class.from_pretrained(tiny_model_dir)).save_pretrained(other)
    data = tiny_model_dir / "data.jsonl"
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # its name_or_path names the directory
    eval_math.evaluate(model, AutoTokenizer.from_pretrained(tiny_model_dir), eval_math.load_records(data), n=2,
                       temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=6, out_dir=out, seed=0,
                       data_path=data)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == str(tiny_model_dir) and settings["backend"] == "hf"
    assert settings["model_hash"] == eval_math.model_hash(tiny_model_dir) != eval_math.model_hash(other)
    assert settings["data"] == str(data) and settings["data_hash"] == eval_math.file_sha256(data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    common = ["--n", "2", "--temperature", "1.0", "--max-new-tokens", "8", "--batch-size", "6", "--seed", "0",
              "--out", out]

    def refused(*names, model=other, data=data):
        proc = _eval_cli("--model", model, "--data", data, *common)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(f"eval.math: error: {out} holds samples made with other settings: ")
        assert all(n in lines[0] for n in names), lines[0]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    refused(f"model {str(tiny_model_dir)!r} (this run: {str(other)!r})", "model_hash changed", "--restart")
    moved = tmp_path / "moved_data.jsonl"
    moved.write_text(data.read_text().replace("p2", "p2x"))
    refused("data ", "data_hash changed", model=tiny_model_dir, data=moved)
    same_dir = tmp_path / "same_dir"  # A's directory, new weights of the same sizes (hf/best replaced)
    shutil.copytree(tiny_model_dir, same_dir)
    _eval_cli("--model", same_dir, "--data", data, *common[:-1], tmp_path / "same_out")
    shutil.copy(other / "model.safetensors", same_dir / "model.safetensors")
    proc = _eval_cli("--model", same_dir, "--data", data, *common[:-1], tmp_path / "same_out")
    assert proc.returncode == 2 and "model_hash changed" in proc.stderr and "model '" not in proc.stderr

    proc = _eval_cli("--model", other, "--data", data, *common, "--restart")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 of 3 problems already done" in proc.stdout
    alone = tmp_path / "alone"
    assert _eval_cli("--model", other, "--data", data, *common[:-1], alone).returncode == 0
    assert (out / "samples.jsonl").read_text() == (alone / "samples.jsonl").read_text()  # B's own samples only
    assert json.loads((out / "settings.json").read_text())["model"] == str(other)


# --- grading a reasoning model's answer (after its last </think>) ---------------------------------

THOUGHT = "<think>\nLet me compute. 12 * 17 = 204, so the answer is \\boxed{204}. Hmm, let me double check"


@pytest.mark.parametrize("text, truncated, think_open, after_think, whole", [
    (THOUGHT, True, False, False, True),  # cut off inside its thinking: no answer (whole: graded on the thought)
    (THOUGHT, False, False, False, True),  # ended (end-of-turn) with its <think> still open
    (THOUGHT + " ... yes.\n</think>\nThe answer is $\\boxed{204}$.", False, False, True, True),
    (THOUGHT + "\n</think>\nSo it is \\boxed{205}.", False, False, False, False),  # final answer wins
    (THOUGHT + "\n</think>\nI could not decide.", False, False, False, True),  # the boxed thought is no answer
    (THOUGHT + "\n</think>\n\\boxed{204}, and then", True, False, False, True),  # cut off before its end-of-turn
    ("12 * 17 = 204, so \\boxed{204}.", False, False, True, True),  # no thinking block: the whole text
    ("12 * 17 = 204, so \\boxed{204}.", False, True, False, True),  # the template opened <think>: never closed
    ("12 * 17 = 204.\n</think>\n\\boxed{204}", False, True, True, True),  # ... and closed
    ("<think>a</think> \\boxed{7} <think> so \\boxed{204}", False, False, False, True),  # a second think, open
])
def test_grade_reads_the_answer_after_the_thinking(text, truncated, think_open, after_think, whole):
    rec = {"id": "q", "answer": "204"}
    got = eval_math.grade(rec, 0, text, 99, truncated, think_open=think_open)  # the default: after-think
    assert got["correct"] is after_think and (got["answer"] is None) == (not after_think and "205" not in text)
    assert eval_math.grade(rec, 0, text, 99, truncated, answer_from="whole")["correct"] is whole
    from reward import score
    assert whole == (score(text, "204") == 1.0)  # whole: the training rewards' reading, unchanged


def test_evaluate_grades_truncated_thinking_as_wrong_and_shows_its_share(tokenizer, tmp_path):
    """evaluate() with a scripted model whose second sample is cut off inside <think> after a right boxed
    guess; with a chat template that opens <think> itself, a text without </think> has no answer."""
    (a,) = problems = _problems(ks=(1,))
    good = synthetic.correct_trace(a)
    cut = good[:good.index("</think>")] + "so \\boxed{%d} Hmm" % a.answer + " wait" * 40  # > 64 tokens
    model = ScriptedModel(tokenizer, {a.question: [good, cut]})
    s = eval_math.evaluate(model, tokenizer, _records(problems), n=2, temperature=0.6, top_p=0.95,
                           max_new_tokens=64, batch_size=2, out_dir=tmp_path / "a", instruction="")
    lines = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [(x["correct"], x["truncated"], x["answer"]) for x in lines] == [(True, False, str(a.answer)),
                                                                             (False, True, None)]
    assert s["avg@n"] == 50.0 and s["truncated"] == 50.0
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["answer_from"] == "after-think"
    whole = eval_math.evaluate(ScriptedModel(tokenizer, {a.question: [good, cut]}), tokenizer, _records(problems),
                               n=2, temperature=0.6, top_p=0.95, max_new_tokens=64, batch_size=2,
                               out_dir=tmp_path / "w", instruction="", answer_from="whole")
    assert whole["avg@n"] == 100.0  # the old reading counted the cut-off guess
    with pytest.raises(ValueError, match="answer_from 'after-think' \\(this run: 'whole'\\)"):
        eval_math.evaluate(model, tokenizer, _records(problems), n=2, temperature=0.6, top_p=0.95,
                           max_new_tokens=64, batch_size=2, out_dir=tmp_path / "a", instruction="",
                           answer_from="whole")

    opened = synthetic.build_tokenizer(tmp_path / "tok")  # R1-Distill style: the generation prompt opens <think>
    opened.chat_template = opened.chat_template.replace("assistant\\n", "assistant\\n<think>\\n") \
        if "assistant\\n" in opened.chat_template else opened.chat_template + "<think>\n"
    assert eval_math.build_prompt(opened, "q", "").rstrip().endswith("<think>")
    thought = good[len("<think>\n"):]  # the model's text starts inside the block the template opened
    scripts = {a.question: [thought, thought.replace("</think>", "")]}
    s = eval_math.evaluate(ScriptedModel(opened, scripts), opened, _records(problems), n=2, temperature=0.6,
                           top_p=0.95, max_new_tokens=64, batch_size=2, out_dir=tmp_path / "o", instruction="")
    lines = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in lines] == [True, False] and s["truncated"] == 0.0


def test_table_shows_the_truncated_share(tmp_path):
    _summary(tmp_path / "runs" / "base" / "eval" / "aime24", **{"avg@n": 10.0, "truncated": 12.5})
    _summary(tmp_path / "runs" / "base" / "eval" / "amc23" / "seed0", **{"avg@n": 50.0, "truncated": 1.0})
    _summary(tmp_path / "runs" / "base" / "eval" / "amc23" / "seed1", **{"avg@n": 52.0, "truncated": 2.0})
    _summary(tmp_path / "runs" / "sft" / "eval" / "amc23", **{"avg@n": 60.0, "truncated": 0.0})
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    table.main([str(tmp_path / "runs"), "--out", str(md), "--json", str(js)])
    assert md.read_text().endswith("truncated (% of samples cut off at --max-new-tokens)\n\n"
                                   "| Model | aime24 | amc23 |\n| --- | ---: | ---: |\n"
                                   "| base | 12.5 | 1.5 |\n| sft | – | 0.0 |\n")
    stats = json.loads(js.read_text())
    assert stats["base"]["amc23"]["truncated"] == 1.5 and stats["base"]["amc23"]["mean"] == 51.0


def test_vllm_gets_the_prompt_token_ids(tokenizer, tmp_path, monkeypatch):
    """backend=vllm hands vLLM the prompt's token ids as the HF path and the length check tokenize them
    (add_special_tokens=False), never text (vLLM would add the special tokens again). A stand-in vllm module:
    the real engine is exercised by tests/test_vllm.py (.ci/vllm)."""
    import types

    from tokenizers.processors import TemplateProcessing

    bos_tok = synthetic.build_tokenizer(tmp_path / "tok")  # a tokenizer that adds a BOS, like Llama-3's
    bos = bos_tok.eos_token
    bos_tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[
        (bos, bos_tok.eos_token_id)])
    bos_tok.chat_template = bos + bos_tok.chat_template  # ... and a template that emits it too
    seen = []

    class LLM:
        def generate(self, prompts, params, use_tqdm):
            seen.extend(prompts)
            out = types.SimpleNamespace(text="\\boxed{1}", token_ids=[5, 6], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    recs = _records(_problems())
    eval_math.evaluate(LLM(), bos_tok, recs, n=2, temperature=0.6, top_p=0.95, max_new_tokens=8, batch_size=6,
                       out_dir=tmp_path / "v", instruction="", backend="vllm")
    texts = [eval_math.build_prompt(bos_tok, r["problem"], "") for r in recs]
    want = [bos_tok(t, add_special_tokens=False)["input_ids"] for t in texts for _ in range(2)]
    assert seen == [{"prompt_token_ids": ids} for ids in want]
    assert all(ids[0] == bos_tok.eos_token_id != ids[1] for ids in want)  # one BOS, the template's
    assert bos_tok(texts[0])["input_ids"][:2] == [bos_tok.eos_token_id] * 2  # what a text prompt would give


def test_batch_defaults_kv_budget_for_hf_all_pending_for_vllm(tokenizer, tmp_path, monkeypatch):
    """Without --batch-size: HF generate() calls hold max_batch_tokens // (longest prompt + max_new_tokens)
    sequences (a 7B's AIME run: 8, not 64 x 32k tokens of KV cache); vLLM gets every pending sample in one call."""
    import types

    seven_b = lambda prompts, add_special_tokens: {"input_ids": [[0] * 300 for _ in prompts]}  # 300-token prompts
    assert eval_math.default_batch_size(seven_b, ["p"] * 30, 30 * 64, backend="hf", max_new_tokens=31744,
                                        max_batch_tokens=eval_math.DEFAULT_BATCH_TOKENS) == 262144 // 32044 == 8
    assert eval_math.default_batch_size(seven_b, ["p"], 1920, backend="vllm", max_new_tokens=31744,
                                        max_batch_tokens=1) == 1920
    problems = _problems(ks=(1, 2, 2))
    recs = _records(problems)
    longest = max(len(tokenizer(eval_math.build_prompt(tokenizer, r["problem"], ""), add_special_tokens=False)
                      ["input_ids"]) for r in recs)
    scripts = {p.question: [synthetic.correct_trace(p)] * 4 for p in problems}
    model = ScriptedModel(tokenizer, scripts)
    sizes = []
    generate = model.generate
    model.generate = lambda input_ids, **kw: sizes.append(len(input_ids)) or generate(input_ids, **kw)
    budget = 3 * (longest + 64) + 5  # room for 3 sequences
    s = eval_math.evaluate(model, tokenizer, recs, n=4, temperature=0.6, top_p=0.95, max_new_tokens=64,
                           max_batch_tokens=budget, out_dir=tmp_path / "hf", instruction="")
    assert sizes == [3, 3, 3, 3] and s["avg@n"] == 100.0

    calls = []

    class LLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append(len(prompts))
            out = types.SimpleNamespace(text="\\boxed{1}", token_ids=[5], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    eval_math.evaluate(LLM(), tokenizer, recs, n=4, temperature=0.6, top_p=0.95, max_new_tokens=64,
                       max_batch_tokens=budget, out_dir=tmp_path / "vllm", instruction="", backend="vllm")
    assert calls == [12]
    assert len((tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()) == 12
