"""Download the benchmarks of the blog's table and write them as eval JSONL (needs network and `datasets`).

    python launch/prepare_benchmarks.py --out data/benchmarks
    -> aime24.jsonl (30), aime25_i.jsonl (15), aime25_ii.jsonl (15), amc23.jsonl (40), math500.jsonl (500)

Each line {"id", "problem", "answer", "source"}: what eval.math and the validation section read. Sources are the
public Hugging Face copies named in SOURCES (dataset, config, split, problem field, answer field); the answer is
kept as the dataset gives it (math-verify grades equivalent forms). Untested here: this machine has no network
to the Hub, so the field names are as those datasets document them -- the script stops with the dataset and the
fields it found if one has changed.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402

SOURCES = {  # file: (dataset, config, split, problem field, answer field, expected count)
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", 30),
    "aime25_i": ("opencompass/AIME2025", "AIME2025-I", "test", "question", "answer", 15),
    "aime25_ii": ("opencompass/AIME2025", "AIME2025-II", "test", "question", "answer", 15),
    "amc23": ("math-ai/amc23", None, "test", "question", "answer", 40),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", 500),
}


def main(argv=None):
    ap = cli.ArgumentParser(prog="prepare_benchmarks.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="just these benchmarks")
    args = ap.parse_args(argv)
    why = cli.unwritable(args.out, directory=True)
    if why:
        cli.fail("prepare_benchmarks.py", f"--out {args.out}: cannot be written: {why}")
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("prepare_benchmarks.py: error: needs the `datasets` package: pip install datasets")
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or SOURCES:
        dataset, config, split, pfield, afield, expected = SOURCES[name]
        rows = load_dataset(dataset, config, split=split)
        if pfield not in rows.column_names or afield not in rows.column_names:
            sys.exit(f"prepare_benchmarks.py: error: {dataset} ({config}) has fields {rows.column_names}, "
                     f"expected {pfield!r} and {afield!r}")
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"{name}-{i}", "problem": row[pfield], "answer": str(row[afield]),
                                    "source": dataset}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        note = "" if len(rows) == expected else f" (expected {expected}: check the source)"
        print(f"{path}: {len(rows)} problems{note}")


if __name__ == "__main__":
    main()
