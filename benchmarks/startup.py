"""Start-up cost of train.build_data's data path, before and after issue 27, as ratios in one run.

    python benchmarks/startup.py [--questions 250 500 1000 --draw 100 --words 1500 --json startup.json]

A synthetic curated file shaped like the real one (G = 8 long traces per question, mixed words, digits and LaTeX)
and a byte-level BPE tokenizer trained on the same kind of text with `tokenizers` (--vocab entries, ChatML
template), then, each in a fresh process (its peak RSS is the process's own, resource.getrusage):
    all_then_draw   the path before: every record read with its texts, every response tokenised, then the draw
    draw_first      index pass, draw, read + tokenise the drawn questions only, write the token copy (1st start)
    restart         index pass, draw, map the token copy (every later start of the same output_dir)
for each --questions file size with --draw questions drawn. Seconds are wall time of the data path only (model
load and the first step are the same in both and not included); RSS is the peak of that process (Python, torch,
the tokenizer and the data). Printed as a table and written to --json.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402

WORDS = ("the of we so let then sum term check factor prime root case both side equal hence thus wait maybe "
         "compute value answer integer modulo square triangle angle length area probability expected").split()
LATEX = ["\\frac{1}{2}", "x^{2}", "\\sqrt{3}", "\\binom{n}{k}", "\\sum_{i=1}^{n}", "\\pi", "a_{n+1}", "\\cdot"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def trace(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        r = rng.random()
        out.append(rng.choice(WORDS) if r < 0.75 else str(rng.randrange(10 ** rng.randrange(1, 5))) if r < 0.92
                   else rng.choice(LATEX))
    return " ".join(out)


def make_tokenizer(out_dir: str, vocab: int, seed: int = 0) -> None:
    """A byte-level BPE of `vocab` entries trained on synthetic traces, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator((trace(rng, 400) for _ in range(3000)), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)


def make_curated(path: str, questions: int, words: int, group: int = 8, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for q in range(questions):
            rewards = [float(rng.random() < 0.6) for _ in range(group)]
            rec = {"id": f"q{q}", "question": f"Problem {q}: " + trace(rng, 60), "gold": str(q),
                   "responses": [trace(rng, rng.randint(words // 2, words * 3 // 2)) + f" \\boxed{{{q}}}"
                                 for _ in range(group)],
                   "rewards": rewards, "agreement": sum(rewards) / group, "all_positive": all(rewards),
                   "difficulty": rng.randint(1, 10), "source": "startup-benchmark"}
            f.write(json.dumps(rec) + "\n")


def child(mode: str, path: str, tok_dir: str, out_dir: str, k: int, max_len: int) -> dict:
    """The data path of one start, in this process: seconds and peak RSS (MiB)."""
    from transformers import AutoTokenizer

    import data
    import token_cache
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(group_size=8, max_len=max_len, overlong="truncate")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "all_then_draw":
        ds = data.GroupDataset(data.read_records(path), tok, **kw)
        ds.keep(data.draw_questions(len(ds), k, seed=0))
    else:
        index = data.read_records(path, index_only=True)
        order = data.draw_order(len(index), k, seed=0)

        def build():
            d, chosen = data.tokenise_drawn(path, index, order, k, tok, **kw)
            return d, chosen, sorted(index[i]["_line"] for i in order[:k + d.report["drawn_replaced"]])
        fp = token_cache.fingerprint(path, index, order, tok, **kw)
        ds, _, how = token_cache.load_or_build(out_dir, build, fp, path, tok, kw, rank=0, resuming=False)
        assert how == ("built" if mode == "draw_first" else "reused"), how
    seconds = time.perf_counter() - t0
    tokens = sum(len(s) for item in ds.items for s in item[2])
    return {"mode": mode, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_data_mib": base_rss, "questions_kept": len(ds), "tokens_kept": tokens}


def run_child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
    if proc.returncode != 0:
        raise SystemExit(f"startup.py: child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = cli.ArgumentParser(prog="startup.py", description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, nargs="+", default=[250, 500, 1000], help="file sizes (questions)")
    ap.add_argument("--draw", type=int, default=100, help="data.num_questions")
    ap.add_argument("--words", type=int, default=1500, help="mean words per trace (~1.3 tokens per word)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-len", type=int, default=32768)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        mode, path, tok_dir, out_dir, k, max_len = a.child
        print(json.dumps(child(mode, path, tok_dir, out_dir, int(k), int(max_len))))
        return []
    if min(a.questions) < a.draw or a.draw < 1 or a.words < 10 or a.vocab < 300:
        cli.fail("startup.py", f"need 1 <= --draw ({a.draw}) <= every --questions ({a.questions}), --words >= 10, "
                 "--vocab >= 300")
    why = a.json and cli.unwritable(a.json, parents=True)
    if why:
        cli.fail("startup.py", f"--json {a.json}: cannot be written: {why}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(os.path.join(tmp, "tok"), a.vocab)
        for n in a.questions:
            path = os.path.join(tmp, f"curated-{n}.jsonl")
            make_curated(path, n, a.words)
            out = os.path.join(tmp, f"run-{n}")
            for mode in ("all_then_draw", "draw_first", "restart"):
                row = {"questions": n, "file_mib": os.path.getsize(path) / 2 ** 20,
                       **run_child(mode, path, os.path.join(tmp, "tok"), out, a.draw, a.max_len)}
                rows.append(row)
            os.remove(path)
    print(f"{'questions':>9} {'file MiB':>8} {'mode':>14} {'seconds':>8} {'x before':>8} {'peak RSS MiB':>12} "
          f"{'data MiB':>8} {'tokens kept':>11}")
    for r in rows:
        before = next(b for b in rows if b["questions"] == r["questions"] and b["mode"] == "all_then_draw")
        print(f"{r['questions']:>9} {r['file_mib']:>8.1f} {r['mode']:>14} {r['seconds']:>8.2f} "
              f"{r['seconds'] / before['seconds']:>8.3f} {r['peak_rss_mib']:>12.0f} "
              f"{r['peak_rss_mib'] - r['rss_before_data_mib']:>8.0f} {r['tokens_kept']:>11}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
