"""Bad input at every command-line entry point (cli.py's convention): exactly one line `<command>: error: ...`
on stderr naming the file:line, key or value, exit status 2, no traceback, and nothing written anywhere under
the test's directory. Each case runs the real command in a subprocess and fails in its pre-checks (no model
is loaded, no row is curated). train.py's own bad-input lines are tests/test_faults.py's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import synthetic
from eval import math as eval_math

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
AS_ROOT = os.geteuid() == 0  # root writes into read-only directories: those cases cannot fail for it


def tree(root: Path) -> dict:
    """Every path under root -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(tmp_path, command: str, args: list, *names) -> str:
    """Run `python args...` in the repo root; assert the one-line refusal naming each of `names`, and that
    nothing under tmp_path changed. Returns the line."""
    before = tree(tmp_path)
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr[-3000:]
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert tree(tmp_path) == before, "the refused command wrote something"
    return lines[0]


@pytest.fixture
def a_file(tmp_path):
    """A regular file: paths under it cannot be made."""
    p = tmp_path / "a_file"
    p.write_text("x\n")
    return p


@pytest.fixture
def read_only_dir(tmp_path):
    if AS_ROOT:
        pytest.skip("root can write into a read-only directory")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def test_cli_helpers(tmp_path, a_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("cmd", "two\nlines")
    assert e.value.code == 2 and capsys.readouterr().err == "cmd: error: two lines\n"
    assert cli.unwritable(tmp_path / "new" / "deeper", directory=True) is None
    assert cli.unwritable(tmp_path / "out.md") is None
    assert cli.unwritable(tmp_path / "nodir" / "out.md") == f"directory {tmp_path / 'nodir'} does not exist"
    assert cli.unwritable(a_file / "x" / "y", directory=True) == f"{a_file} is not a directory"
    assert cli.unwritable(a_file / "x.md") == f"{a_file} is not a directory"
    assert cli.unwritable(a_file, directory=True) == f"{a_file} exists and is not a directory"
    assert cli.unwritable(tmp_path) == f"{tmp_path} is a directory"


# --------------------------------------------------------------------------- python -m eval.math

MAX_POSITIONS = 64


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A model directory that passes the file checks (config.json, an empty weights file, the tiny lab's
    tokenizer: nothing loads the weights before the checks pass) and a good data file."""
    root = tmp_path_factory.mktemp("eval_lab")
    model = root / "model"
    tok = synthetic.build_tokenizer(model)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": MAX_POSITIONS}))
    (model / "model.safetensors").write_bytes(b"")
    data = root / "data.jsonl"
    data.write_text(json.dumps({"id": "p0", "problem": "1+1?", "answer": "2"}) + "\n")
    prompt = len(tok(eval_math.build_prompt(tok, "1+1?", ""), add_special_tokens=False)["input_ids"])
    return {"model": model, "data": data, "prompt_tokens": prompt}


def eval_math_refuses(tmp_path, lab, *names, model=None, data=None, out=None, extra=()):
    args = ["-m", "eval.math", "--model", model or lab["model"], "--data", data or lab["data"],
            "--out", out or tmp_path / "out", "--n", "2", "--max-new-tokens", "8", "--no-instruction", *extra]
    return refused(tmp_path, "eval.math", args, *names)


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


GOOD = b'{"problem": "1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("lines, names", [
    ([GOOD, b'{"problem": "2+2?", "answer": \n'], [":2: not valid JSON"]),
    ([GOOD, b"\n", b'{"answer": "4"}\n'], [":3:", "'problem'"]),
    ([GOOD, b'{"problem": "2+2?"}\n'], [":2:", "'answer'"]),
    ([GOOD, b'{"problem": "caf\xe9?", "answer": "1"}\n'], [":2: not UTF-8"]),
    ([GOOD, b"[1, 2]\n"], [":2: expected a JSON object"]),
    ([GOOD, b'{"problem": 5, "answer": "1"}\n'], [":2: 'problem' must be a string"]),
    ([b'{"id": 7, "problem": "a", "answer": "1"}\n', b'{"id": "7", "problem": "b", "answer": "1"}\n'],
     [":2: duplicate id '7' (also at line 1)"]),
    ([b"\n"], ["no records"]),
])
def test_eval_math_bad_data_file(tmp_path, lab, lines, names):
    data = write(tmp_path / "bad.jsonl", lines)
    eval_math_refuses(tmp_path, lab, str(data), *names, data=data)


def test_eval_math_missing_data_file(tmp_path, lab):
    eval_math_refuses(tmp_path, lab, f"--data {tmp_path / 'nope.jsonl'}: no such file", data=tmp_path / "nope.jsonl")


@pytest.mark.parametrize("extra, names", [
    (["--n", "0"], ["--n 0: must be >= 1"]),
    (["--temperature", "-1"], ["--temperature -1: must be >= 0"]),
    (["--top-p", "0"], ["--top-p 0: must be in (0, 1]"]),
    (["--top-p", "1.5"], ["--top-p 1.5: must be in (0, 1]"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens 0: must be >= 1"]),
    (["--n", "two"], ["argument --n: invalid int value: 'two'"]),  # argparse's own errors: one line too
])
def test_eval_math_bad_numbers(tmp_path, lab, extra, names):
    eval_math_refuses(tmp_path, lab, *names, extra=extra)


def test_eval_math_model_directory_without_config_or_weights(tmp_path, lab):
    eval_math_refuses(tmp_path, lab, f"--model {tmp_path / 'nope'}: no such directory", "config.json",
                      model=tmp_path / "nope")  # (transformers: "Repo id must be in the form ...")
    (tmp_path / "empty").mkdir()
    eval_math_refuses(tmp_path, lab, f"--model {tmp_path / 'empty'}: no config.json", model=tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((lab["model"] / name).read_bytes())
    eval_math_refuses(tmp_path, lab, f"--model {no_weights}: no weights", "model.safetensors", model=no_weights)
    (no_weights / "model.safetensors").write_bytes(b"")
    (no_weights / "config.json").write_text('{"model_type": "qwen2",\n "max_position_embeddings": }\n')
    eval_math_refuses(tmp_path, lab, f"{no_weights / 'config.json'}:2: not valid JSON", model=no_weights)


def test_eval_math_prompt_plus_new_tokens_beyond_the_positions_is_refused(tmp_path, lab):
    room = MAX_POSITIONS - lab["prompt_tokens"]
    line = eval_math_refuses(tmp_path, lab, f"--max-new-tokens {room + 1}:", "max_position_embeddings",
                             f"{MAX_POSITIONS} positions of {lab['model'] / 'config.json'}",
                             f"use --max-new-tokens <= {room}", extra=["--max-new-tokens", str(room + 1)])
    assert f"longest prompt (id p0, {lab['prompt_tokens']} tokens)" in line


def test_max_positions_follows_rope_scaling():
    assert eval_math.max_positions({"max_position_embeddings": 32768}) == 32768
    assert eval_math.max_positions({"max_position_embeddings": 32768, "rope_scaling": None}) == 32768
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert eval_math.max_positions({"max_position_embeddings": 32768, "rope_scaling": yarn}) == 131072
    assert eval_math.max_positions({}) is None


def test_eval_math_unwritable_or_reused_out(tmp_path, lab, a_file):
    eval_math_refuses(tmp_path, lab, f"--out {a_file / 'run'}: cannot be written", f"{a_file} is not a directory",
                      out=a_file / "run")
    out = tmp_path / "run"
    eval_math_refuses(tmp_path, lab, f"--out {out} is given twice", extra=["--model", lab["model"], lab["model"],
                                                                         "--out", out, out])
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({**dict.fromkeys(eval_math.SETTINGS_KEYS), "n": 3}))
    eval_math_refuses(tmp_path, lab, f"{out} holds samples made with other settings", "n 3 (this run: 2)",
                      "another --out", out=out)


def test_eval_math_read_only_out(tmp_path, lab, read_only_dir):
    eval_math_refuses(tmp_path, lab, f"--out {read_only_dir / 'run'}: cannot be written", "not writable",
                      out=read_only_dir / "run")


# --------------------------------------------------------------------------- python -m eval.table

def summary(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, names", [
    (b'{"avg@n": 1.0,\n "maj@n": }\n', [":2: not valid JSON"]),
    (b'{"avg@n": 1.0,\n "note": "caf\xe9"}\n', [":2: not UTF-8"]),
    (b"[1, 2]\n", [": expected a JSON object", "got list"]),
    (b'{"maj@n": 1.0, "n": 4}\n', [": no metric 'avg@n'", "--metric: one of maj@n, n"]),
    (b'{"avg@n": "12", "n": 4}\n', [": metric 'avg@n' is a str, not a number", "--metric: one of n"]),
])
def test_eval_table_bad_summary(tmp_path, content, names):
    path = summary(tmp_path / "runs" / "base" / "aime24" / "summary.json", content)
    refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "runs", "--out", tmp_path / "r.md"],
            str(path), *names)


def test_eval_table_missing_paths_and_unwritable_outputs(tmp_path, a_file):
    md = tmp_path / "r.md"
    refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "nope", "--out", md],
            f"{tmp_path / 'nope'}: no such file or directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "empty", "--out", md],
            f"no summary.json under {tmp_path / 'empty'}")
    summary(tmp_path / "runs" / "base" / "aime24" / "summary.json", b'{"avg@n": 1.0}')
    refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "runs", "--out", a_file / "r.md"],
            f"--out {a_file / 'r.md'}: cannot be written", f"{a_file} is not a directory")
    refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "runs", "--out", md, "--json",
                                     a_file / "r.json"],
            f"--json {a_file / 'r.json'}: cannot be written", f"{a_file} is not a directory")
    refused(tmp_path, "eval.table", ["-m", "eval.table", "--out", md], "the following arguments are required: paths")


def test_eval_table_names_a_missing_input_before_its_out_and_makes_out_after(tmp_path):
    """Issue 28.3: neither the input nor --out's directory exists: the input is named (the error a user needs
    first) and no directory is made; with the input there, --out's and --json's directories are made."""
    line = refused(tmp_path, "eval.table", ["-m", "eval.table", tmp_path / "runs" / "nothing", "--out",
                                            tmp_path / "results" / "r.md"], f"{tmp_path / 'runs' / 'nothing'}")
    assert "results" not in line
    summary(tmp_path / "runs" / "base" / "aime24" / "summary.json", b'{"avg@n": 50.0, "n": 4}')
    out, js = tmp_path / "results" / "a" / "r.md", tmp_path / "numbers" / "r.json"
    proc = subprocess.run([sys.executable, "-m", "eval.table", tmp_path / "runs", "--out", out, "--json", js],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "50.0" in out.read_text() and json.loads(js.read_text())


# An --out that cannot be made although permission bits allow it (as root they always do): the probe finds it.
UNMAKEABLE = Path("/proc/offgrpo-forbidden")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_made_is_one_line_at_every_cli(tmp_path, raw):
    """Issue 28.2: every CLI's --out / --output / --json under /proc (creation fails with ENOENT, even for root)."""
    bad = UNMAKEABLE / "x"
    summary(tmp_path / "runs" / "base" / "aime24" / "summary.json", b'{"avg@n": 1.0}')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for command, args, flag in [
            ("synthetic.py", ["synthetic.py", "--out", bad], "--out"),
            ("curate.py", ["curate.py", "--input", raw, "--output", bad / "c.jsonl"], "--output"),
            ("eval.table", ["-m", "eval.table", tmp_path / "runs", "--out", bad / "r.md"], "--out"),
            ("eval.plot", ["-m", "eval.plot", tmp_path / "run", "--out", bad / "c.png"], "--out"),
            ("prepare_benchmarks.py", ["launch/prepare_benchmarks.py", "--out", bad], "--out"),
            ("memory.py", ["benchmarks/memory.py", "configs/bias05.yaml", "--world", "8", "--gpu-memory", "80",
                           "--json", UNMAKEABLE / "m.json"], "--json")]:
        line = refused(tmp_path, command, args, flag, "cannot be written", UNMAKEABLE)
        assert "Traceback" not in line
    assert not UNMAKEABLE.exists()


# --------------------------------------------------------------------------- curate.py

@pytest.fixture
def raw(tmp_path):
    row = {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "\\boxed{2}"}],
           "domain": "math"}
    p = tmp_path / "raw.jsonl"
    p.write_text((json.dumps(row) + "\n") * 8)
    return p


def test_curate_missing_input(tmp_path, raw):
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, tmp_path / "nope.jsonl", "--output",
                                    tmp_path / "out.jsonl"], f"--input {tmp_path / 'nope.jsonl'}: no such file")


def test_curate_unwritable_output(tmp_path, raw, a_file):
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, "--output", a_file / "out.jsonl"],
            f"--output {a_file / 'out.jsonl'}: cannot be written", f"{a_file} is not a directory")


def test_curate_output_in_a_missing_directory_or_onto_its_input(tmp_path, raw):
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, "--output", tmp_path / "nodir" / "out.jsonl"],
            f"--output {tmp_path / 'nodir' / 'out.jsonl'}: cannot be written",
            f"directory {tmp_path / 'nodir'} does not exist")
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, "--output", raw],
            f"--output {raw} is also an --input")


def test_curate_read_only_output(tmp_path, raw, read_only_dir):
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, "--output", read_only_dir / "out.jsonl"],
            f"--output {read_only_dir / 'out.jsonl'}: cannot be written", "not writable")


@pytest.mark.parametrize("extra, names", [
    (["--group-size", "8", "--min-samples", "4"], ["--min-samples 4: must be >= --group-size (8)"]),
    (["--min-agreement", "1.5"], ["--min-agreement 1.5: must be in [0, 1]"]),
])
def test_curate_bad_numbers(tmp_path, raw, extra, names):
    refused(tmp_path, "curate.py", ["curate.py", "--input", raw, "--output", tmp_path / "out.jsonl", *extra],
            *names)


@pytest.mark.parametrize("extra, message", [
    (["--group-size", "0"], "--group-size 0: must be >= 1"),
    (["--workers", "0"], "--workers 0: must be >= 1"),
])
def test_curate_bad_numbers_in_process(tmp_path, raw, capsys, extra, message):  # (each subprocess imports torch)
    import curate

    with pytest.raises(SystemExit) as e:
        curate.main(["--input", str(raw), "--output", str(tmp_path / "out.jsonl"), *extra])
    assert e.value.code == 2 and capsys.readouterr().err == f"curate.py: error: {message}\n"
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------- synthetic.py

def test_synthetic_unwritable_out(tmp_path, a_file):
    refused(tmp_path, "synthetic.py", ["synthetic.py", "--out", a_file / "tiny"],
            f"--out {a_file / 'tiny'}: cannot be written", f"{a_file} is not a directory")
    refused(tmp_path, "synthetic.py", ["synthetic.py", "--out", a_file],
            f"--out {a_file}: cannot be written", "exists and is not a directory")


def test_synthetic_read_only_out(tmp_path, read_only_dir):
    refused(tmp_path, "synthetic.py", ["synthetic.py", "--out", read_only_dir / "tiny"],
            f"--out {read_only_dir / 'tiny'}: cannot be written", "not writable")


@pytest.mark.parametrize("extra, names", [
    (["--mid-k", "1-x"], ["--mid-k '1-x': expected a range like 1-6"]),
    (["--teacher-k", "0"], ["--teacher-k '0':", "k in 1..26"]),
    (["--mid-weights", "1,2"], ["--mid-weights '1,2': needs one weight per --mid-k value (6)"]),
    (["--mid-k", "1,2", "--mid-weights", "1,-1"], ["--mid-weights '1,-1': expected positive numbers"]),
    (["--modulus", "1"], ["--modulus 1: must be >= 2"]),
    (["--n-eval", "0"], ["--n-eval 0: must be >= 1"]),
    (["--eval-id-k", "1", "--modulus", "2", "--n-eval", "100"],  # k = 1, mod 2 has 12 questions: drawn before writing
     ["cannot draw 100 distinct new problems with k=1, modulus=2"]),
])
def test_synthetic_bad_values(tmp_path, extra, names):
    refused(tmp_path, "synthetic.py", ["synthetic.py", "--out", tmp_path / "tiny", *extra], *names)


# --------------------------------------------------------------------------- benchmarks/*.py, launch/prepare_*.py

def test_benchmark_bad_numbers(tmp_path):
    refused(tmp_path, "packing.py", ["benchmarks/packing.py", "--steps", "1"], "--steps 1", "--steps >= 3")
    refused(tmp_path, "packing.py", ["benchmarks/packing.py", "--tokens", "x"], "argument --tokens: invalid int")
    refused(tmp_path, "logprob.py", ["benchmarks/logprob.py", "--n", "0"], "--n 0: must be >= 1")
    refused(tmp_path, "train_step.py", ["benchmarks/train_step.py", "--hidden", "12"],
            "--hidden 12: must be a positive multiple of 8")


def test_memory_benchmark_unwritable_json(tmp_path, a_file):
    refused(tmp_path, "memory.py", ["benchmarks/memory.py", "configs/bias05.yaml", "--world", "8", "--gpu-memory",
                                    "80", "--json", a_file / "m.json"],
            f"--json {a_file / 'm.json'}: cannot be written", f"{a_file} is not a directory")


def test_prepare_scripts_unwritable_out_and_bad_numbers(tmp_path, a_file):
    refused(tmp_path, "prepare_benchmarks.py", ["launch/prepare_benchmarks.py", "--out", a_file / "bench"],
            f"--out {a_file / 'bench'}: cannot be written", f"{a_file} is not a directory")
    refused(tmp_path, "prepare_benchmarks.py", ["launch/prepare_benchmarks.py", "--out", tmp_path / "b", "--only",
                                                "aime99"], "argument --only: invalid choice: 'aime99'")
    refused(tmp_path, "prepare_openthoughts.py", ["launch/prepare_openthoughts.py", "--out",
                                                  tmp_path / "nodir" / "ot3.jsonl"],
            f"--out {tmp_path / 'nodir' / 'ot3.jsonl'}: cannot be written", "does not exist")
    refused(tmp_path, "prepare_openthoughts.py", ["launch/prepare_openthoughts.py", "--out", tmp_path / "ot3.jsonl",
                                                  "--limit", "0"], "--limit 0: must be >= 1")


# --------------------------------------------------------------------------- data.py, train.py's data checks (issue 28)

def test_data_py_is_no_command_and_names_curate(tmp_path):
    """The earlier README's `python data.py curate ...` must not succeed silently (issue 28.1)."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"id": "a"}\n')
    line = refused(tmp_path, "data.py", ["data.py", "curate", "--input", raw, "--output", tmp_path / "c.jsonl"],
                   "python curate.py")
    assert f"--input {raw} --output {tmp_path / 'c.jsonl'}" in line


def test_group_size_above_the_data_is_named_before_the_question_draw(tmp_path):
    """group_size 16 on 8-response questions with a question draw: the cause (the largest group size the data
    has), not the draw's consequence (issue 28.4). A real train.py process; it writes only its config.yaml."""
    import yaml
    from tests.test_train import TINY_MODEL
    synthetic.build_tokenizer(tmp_path / "tok")
    rec = {"question": "1+1?", "responses": ["<think>a</think> 2"] * 8, "rewards": [1.0] * 8, "gold": "2",
           "agreement": 1.0, "all_positive": True, "difficulty": None, "source": None}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({**rec, "id": f"q{i}"}) + "\n" for i in range(20)))
    cfg = {"model": {"init_config": TINY_MODEL, "tokenizer": str(tmp_path / "tok")},
           "data": {"train_path": str(tmp_path / "c.jsonl"), "group_size": 8, "max_len": 128, "num_questions": 12},
           "train": {"questions_per_step": 2, "max_steps": 1}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "train.py", str(tmp_path / "c.yaml"), "data.group_size=16"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"data error: {tmp_path / 'c.jsonl'}: data.group_size=16 but the most responses any question has is 8 "
        "(20 questions)"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
