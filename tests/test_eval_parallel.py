"""eval.math --data-parallel: shard processes over disjoint (problem, sample) pairs, merged into the files one
process writes (real processes on CPU, a tiny random Qwen2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import synthetic
from eval.metrics import summarize

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = synthetic.build_tokenizer(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=synthetic.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    rows = [{"id": f"p{i}", "problem": f"Mod 5: a={i}+1. Find a.", "answer": str((i + 1) % 5)} for i in range(5)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(model_dir, out, *extra):
    args = ["--model", model_dir, "--data", model_dir / "data.jsonl", "--n", "4", "--top-p", "0.95",
            "--max-new-tokens", "6", "--out", out, "--no-instruction", "--seed", "3", *extra]
    return subprocess.run([sys.executable, "-m", "eval.math", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def samples(out):
    return [json.loads(x) for x in (Path(out) / "samples.jsonl").read_text().splitlines()]


def test_two_shards_merge_to_every_sample_once_and_greedy_equals_one_process(model_dir, tmp_path):
    one = run(model_dir, tmp_path / "one", "--temperature", "0")
    two = run(model_dir, tmp_path / "two", "--temperature", "0", "--data-parallel", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    merged = samples(tmp_path / "two")
    assert [(s["id"], s["sample"]) for s in merged] == [(f"p{i}", j) for i in range(5) for j in range(4)]
    assert [s["text"] for s in merged] == [s["text"] for s in samples(tmp_path / "one")]  # greedy: the same
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == json.loads(json.dumps(summarize(merged)))
    for i in range(2):  # each shard held its own samples s = i, i + 2
        assert {s["sample"] for s in samples(tmp_path / "two" / "shards" / str(i))} == {i, i + 2}
    # the merged directory reads as a finished single-process run
    again = run(model_dir, tmp_path / "two", "--temperature", "0")
    assert again.returncode == 0 and "5 of 5 problems already done" in again.stdout, again.stderr[-2000:]


def test_sampled_shards_resume_and_merge(model_dir, tmp_path):
    out = tmp_path / "s"
    first = run(model_dir, out, "--temperature", "0.8", "--data-parallel", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    merged = (out / "samples.jsonl").read_text()
    assert sorted((s["id"], s["sample"]) for s in samples(out)) == [(f"p{i}", j) for i in range(5) for j in range(4)]
    again = run(model_dir, out, "--temperature", "0.8", "--data-parallel", "2")
    assert again.returncode == 0 and (out / "samples.jsonl").read_text() == merged
    assert "5 of 5 problems already done" in (out / "shards" / "1.log").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--shard", "2/2"], "--shard '2/2': expected I/N with 0 <= I < N"),
    (["--shard", "0/2", "--data-parallel", "2"], "without --data-parallel"),
    (["--data-parallel", "5"], "--n 4: fewer samples per problem than shards (5)"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size needs --backend vllm"),
    (["--data-parallel", "0"], "--data-parallel 0 / --tensor-parallel-size 1: must be >= 1"),
])
def test_bad_parallel_options_are_one_line(model_dir, tmp_path, extra, message):
    proc = run(model_dir, tmp_path / "o", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
