"""Download OpenThoughts3 and write its math rows as local JSONL (needs network and `datasets`).

    python launch/prepare_openthoughts.py --out data/openthoughts3_math.jsonl [--limit 160000]
    python curate.py --input data/openthoughts3_math.jsonl --output data/ot3_math_curated.jsonl

Rows are written unchanged (conversations, domain, source, difficulty, ...), in dataset order, so that
curation (offline, data.py) sees exactly the published rows. OpenThoughts3 stores the 16 samples of a
question as separate rows; --limit counts rows, so use a multiple of 16 to avoid a partial last question
(curation drops questions with too few samples anyway). Streaming mode: nothing but the kept rows is
held in memory or written to disk by this script (the `datasets` cache may still hold shards).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402

DATASET = "open-thoughts/OpenThoughts3-1.2M"


def main(argv=None):
    ap = cli.ArgumentParser(prog="prepare_openthoughts.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many math rows")
    ap.add_argument("--dataset", default=DATASET)
    ap.add_argument("--split", default="train")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        cli.fail("prepare_openthoughts.py", f"--limit {args.limit}: must be >= 1 (math rows to keep)")
    why = cli.unwritable(args.out)
    if why:
        cli.fail("prepare_openthoughts.py", f"--out {args.out}: cannot be written: {why}")
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("prepare_openthoughts.py: error: needs the `datasets` package: pip install datasets")
    rows = load_dataset(args.dataset, split=args.split, streaming=True)
    seen = kept = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            seen += 1
            if row["domain"] != "math":
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
            if kept % 100_000 == 0:
                print(f"{kept} math rows of {seen} read", flush=True)
            if args.limit is not None and kept >= args.limit:
                break
    print(f"wrote {kept} math rows (of {seen} read) to {args.out}")


if __name__ == "__main__":
    main()
