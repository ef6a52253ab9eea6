"""Download OpenThoughts3 and write its math rows as local JSONL (needs network and `datasets`).

    python launch/prepare_openthoughts.py --out data/openthoughts3_math.jsonl [--limit 10000]
    python curate.py --input data/openthoughts3_math.jsonl --output data/ot3_math_curated.jsonl

Rows are written unchanged (conversations, domain, source, difficulty, ...), in dataset order, so that
curation (offline, curate.py) sees exactly the published rows. OpenThoughts3 stores the 16 samples of a
question as separate rows, not necessarily next to each other; --limit counts QUESTIONS: the math rows of the
first L distinct questions (whitespace-normalised first user turn, as curation groups them) wherever their
rows appear, reading on until each has SAMPLES_PER_QUESTION rows or the stream ends (keep_questions).
Streaming mode: nothing but the kept rows and one 8-byte digest + count per kept question is held in memory
or written to disk by this script (the `datasets` cache may still hold shards).
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402

DATASET = "open-thoughts/OpenThoughts3-1.2M"
SAMPLES_PER_QUESTION = 16  # OpenThoughts3's rows per question


def keep_questions(rows, limit: int | None, per_question: int = SAMPLES_PER_QUESTION):
    """The math rows to write, in stream order: all of them (limit None), or those of the first `limit`
    distinct questions, wherever they appear; stops once every one of those questions has per_question rows.
    A row whose turns do not parse (curate.parse_row) is kept only without a limit (curation counts it)."""
    from curate import parse_row
    counts: dict[bytes, int] = {}  # question digest -> rows kept
    full = 0
    for row in rows:
        if row.get("domain") != "math":
            continue
        if limit is None:
            yield row
            continue
        reason, parsed = parse_row(row)
        if reason is not None:
            continue
        key = hashlib.sha1(" ".join(parsed[0].split()).encode("utf-8")).digest()[:8]
        if key not in counts and len(counts) == limit:
            continue
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= per_question:
            yield row
            full += counts[key] == per_question
        if full == limit:
            return


def main(argv=None):
    ap = cli.ArgumentParser(prog="prepare_openthoughts.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--limit", type=int, default=None,
                    help="keep the math rows of the first L distinct questions (wherever their rows are)")
    ap.add_argument("--dataset", default=DATASET)
    ap.add_argument("--split", default="train")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        cli.fail("prepare_openthoughts.py", f"--limit {args.limit}: must be >= 1 (questions to keep)")
    why = cli.unwritable(args.out)
    if why:
        cli.fail("prepare_openthoughts.py", f"--out {args.out}: cannot be written: {why}")
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("prepare_openthoughts.py: error: needs the `datasets` package: pip install datasets")
    rows = load_dataset(args.dataset, split=args.split, streaming=True)
    seen = [0]

    def counted(stream):
        for row in stream:
            seen[0] += 1
            yield row

    kept = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for row in keep_questions(counted(rows), args.limit):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
            if kept % 100_000 == 0:
                print(f"{kept} math rows of {seen[0]} read", flush=True)
    print(f"wrote {kept} math rows (of {seen[0]} read) to {args.out}")


if __name__ == "__main__":
    main()
