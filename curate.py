"""Curation: OpenThoughts3 rows (JSONL/parquet) -> curated JSONL, one record per question (data.py's schema).

    raw rows --parse_row--> math (question, response) pairs grouped by question text --majority_vote-->
    gold, per-sample rewards, agreement --drop / keep group_size (seeded)--> curated JSONL + report

The rules are curate()'s docstring; the record schema is data.py's; the malformed-input rule (skip and count,
>1% of non-blank lines aborts with DataError) is jsonl_io.py's, which both modules read through. Data flows
one way: raw rows -> curate.py -> curated records -> data.py -> batches; neither imports the other.

CLI:  python curate.py --input RAW.jsonl|RAW.parquet [...] --output CURATED.jsonl [--group-size 8]
          [--min-samples G] [--min-agreement 0.5] [--seed 0] [--workers N]
      Prints the report (format_report), writes CURATED.jsonl and CURATED.jsonl.report.json. Bad input
      is one line `curate.py: error: ...` on stderr and exit status 2, nothing written (cli.py): a missing --input, an --output that
      cannot be written or is an --input, --group-size / --workers < 1, --min-samples < --group-size,
      --min-agreement outside [0, 1] (all checked before reading), and a DataError (too many malformed lines).
Sections: raw OpenThoughts3 rows (iter_raw_rows, parse_row) | curation (curate) | report (format_report, CLI).
"""
import hashlib
import json
import os
import random
import sys
import tempfile
from collections import Counter

import cli
from jsonl_io import DataError, MalformedCounter, iter_json_lines


# --------------------------------------------------------------------------- raw OpenThoughts3 rows

USER_ROLES, ASSISTANT_ROLES = {"human", "user"}, {"gpt", "assistant"}


def iter_raw_rows(paths, counter, wanted=None):
    """Yield (file_index, line_no, row dict) from JSONL or parquet files (parquet: line_no = row number)."""
    for fi, path in enumerate(paths):
        if str(path).endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            line_no = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    line_no += 1
                    if wanted is None:
                        counter.total += 1
                    if wanted is None or line_no in wanted[fi]:
                        yield fi, line_no, row
        else:
            for line_no, row in iter_json_lines(path, counter, None if wanted is None else wanted[fi]):
                yield fi, line_no, row


def parse_row(row):
    """OpenThoughts3 row -> (None, (question, response, source, difficulty, dag)) or (reason, None).

    Turns: `from` or `role` in {human, user} / {gpt, assistant}, text in `value` or `content`; the
    question is the first user turn, the response the first assistant turn after it. Reason "not_math"
    (a skip, not malformed) for a domain other than "math"; rows without a domain (or domain null) are
    KEPT -- local math-only dumps and the synthetic teacher may omit it -- and counted as rows_no_domain.
    difficulty: int, integral float or digit string (-> int), or null."""
    conv, domain, source = row.get("conversations"), row.get("domain"), row.get("source")
    difficulty, dag = row.get("difficulty"), row.get("dag")
    if conv is None:
        return "missing_turns", None
    if (not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv)
            or not isinstance(domain, (str, type(None))) or not isinstance(source, (str, type(None)))
            or not isinstance(dag, (dict, type(None)))):
        return "wrong_type", None
    if domain is not None and domain != "math":
        return "not_math", None
    if (isinstance(difficulty, str) and difficulty.strip().isdigit()
            or isinstance(difficulty, float) and difficulty.is_integer()):
        difficulty = int(difficulty)
    elif difficulty is not None and (not isinstance(difficulty, int) or isinstance(difficulty, bool)):
        return "wrong_type", None
    question = response = None
    for turn in conv:
        # parquet structs may hold both key pairs with one of them null, hence `or`
        role = next((turn[k] for k in ("from", "role") if turn.get(k) is not None), None)
        text = next((turn[k] for k in ("value", "content") if turn.get(k) is not None), None)
        if not isinstance(role, str) or not isinstance(text, str):
            return "wrong_type", None
        if question is None and role in USER_ROLES:
            question = text
        elif question is not None and role in ASSISTANT_ROLES:
            response = text
            break
    if question is None or response is None:
        return "missing_turns", None
    if not question.strip() or not response.strip():
        return "empty_question" if not question.strip() else "empty_response", None
    return None, (question, response, source, difficulty, dag)


# --------------------------------------------------------------------------- curation

def _vote(job):
    """Worker: (answers, true_answer | None) -> (gold, rewards, gold_correct | None, string-only comparisons,
    comparisons past the vote's time budget) -- the last two: reward.STATS counts of this vote."""
    from reward import STATS, answers_equivalent, majority_vote
    answers, truth = job
    before = STATS.copy()
    gold, rewards = majority_vote(answers)  # reward.VOTE_BUDGET_SECONDS per question
    correct = None if truth is None or gold is None else answers_equivalent(gold, truth)
    return (gold, rewards, correct, STATS["string_only"] - before["string_only"],
            STATS["over_budget"] - before["over_budget"])


class WorkerDied(RuntimeError):
    """A voting process died (killed: the OOM killer, a signal); the CLI prints it as one line, exit 1."""


def curate(inputs, output, *, group_size=8, min_samples=None, min_agreement=0.5, seed=0, workers=1):
    """Raw rows -> curated JSONL (one record per question) + <output>.report.json; returns the report.

    1. read rows (parse_row), group math rows by whitespace-normalised question text (_group_rows);
    2. answers = vote_answer(response) (the boxes after the last </think> joined ", " -- several values in
       several boxes -- else the last box); gold, rewards = majority_vote(all answers of the question)
       (math-verify equivalence clusters; equal strings short-circuit in answers_equivalent);
       agreement = |majority cluster| / #samples (unanswered samples count in the denominator) (_vote_groups);
    3. drop questions, in this order: fewer than min_samples (default group_size) samples, no boxed
       answer in any sample, a tie for the majority (gold None), agreement < min_agreement;
    4. keep group_size responses: a random subset from random.Random(f"{seed}:{question key}") over the
       samples sorted by response hash -- deterministic given the seed and the samples, not file order;
       all_positive = every kept reward > 0 (_select).
    Two passes over the inputs (answers and line numbers first, kept responses second, spilled to a temporary
    file: _write_kept) keep memory small whatever the row order. The output is written to <output>.tmp and renamed when complete.
    """
    min_samples = group_size if min_samples is None else min_samples
    if min_samples < group_size:
        raise ValueError(f"min_samples {min_samples} < group_size {group_size}")
    counter = MalformedCounter()
    groups, skipped = _group_rows(inputs, counter)
    counter.check("curate")
    drops = Counter({"too_few_samples": 0, "no_boxed_answer": 0, "tie": 0, "low_agreement": 0})
    jobs, votes = _vote_groups(groups, min_samples, workers, drops)
    kept, wanted, hist, gold_correct = _select(groups, jobs, votes, len(inputs), group_size=group_size,
                                               min_agreement=min_agreement, seed=seed, drops=drops)
    num_kept, num_all_positive = len(kept), sum(r["all_positive"] for r in kept.values())
    _write_kept(inputs, output, kept, wanted)
    report = {"inputs": [str(p) for p in inputs], "output": str(output),
              "settings": {"group_size": group_size, "min_samples": min_samples, "min_agreement": min_agreement,
                           "seed": seed},
              "rows_read": counter.total, "rows_malformed": counter.num_malformed, "malformed": counter.reasons,
              "rows_not_math": skipped["rows_not_math"], "rows_no_domain": skipped["rows_no_domain"],
              "questions_read": len(groups), "questions_kept": num_kept, "dropped": dict(drops),
              "comparisons_string_only": sum(v[3] for v in votes),  # degenerate answers (reward.symbolic_ok)
              "votes_over_budget": sum(v[4] > 0 for v in votes),  # votes past reward.VOTE_BUDGET_SECONDS
              "all_positive_share": num_all_positive / num_kept if num_kept else 0.0,
              "agreement_histogram": {f"[{i / 10:.1f},{(i + 1) / 10:.1f}{']' if i == 9 else ')'}": n
                                      for i, n in enumerate(hist)}}
    if gold_correct["voted"]:  # synthetic task: majority label vs the ground truth
        report["majority_accuracy"] = {k: sum(v) / len(v) if v else None for k, v in gold_correct.items()}
    with open(f"{output}.report.json.tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(f"{output}.report.json.tmp", f"{output}.report.json")
    return report


def _group_rows(inputs, counter):
    """First pass: {question key: {question, samples [(response digest, answer, file index, line)], source,
    difficulty, dag}} and the counts of skipped rows; malformed rows go to counter."""
    from reward import vote_answer
    groups, skipped = {}, Counter()
    for fi, line_no, row in iter_raw_rows(inputs, counter):
        reason, parsed = parse_row(row)
        if reason == "not_math":
            skipped["rows_not_math"] += 1
        elif reason is not None:
            counter.bad(reason, f"{inputs[fi]}:{line_no}")
        else:
            question, response, source, difficulty, dag = parsed
            skipped["rows_no_domain"] += row.get("domain") is None
            key = " ".join(question.split())
            g = groups.setdefault(key, {"question": question, "samples": [], "source": source,
                                        "difficulty": difficulty, "dag": dag})
            g["question"] = min(g["question"], question)  # a deterministic variant when rows differ in spacing
            digest = hashlib.sha1(response.encode()).digest()[:8]
            g["samples"].append((digest, vote_answer(response), fi, line_no))
    return groups, skipped


def _vote_groups(groups, min_samples, workers, drops):
    """Drop the groups with too few samples or no boxed answer (counted in drops); majority-vote the others:
    (jobs [(key, (answers, true answer or None))], votes [(gold, rewards, gold correct or None)])."""
    jobs = []
    for key, g in groups.items():
        g["samples"].sort()
        if len(g["samples"]) < min_samples:
            drops["too_few_samples"] += 1
        elif all(s[1] is None for s in g["samples"]):
            drops["no_boxed_answer"] += 1
        else:
            truth = None if g["dag"] is None else _true_answer(g["dag"])
            jobs.append((key, ([s[1] for s in g["samples"]], truth)))
    if workers > 1:  # math-verify is the cost; equal strings never reach it (answers_equivalent)
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        try:  # (multiprocessing.Pool.map waits forever for the results of a worker the OOM killer took)
            with ProcessPoolExecutor(workers) as pool:
                votes = list(pool.map(_vote, [j for _, j in jobs], chunksize=max(1, len(jobs) // (8 * workers))))
        except BrokenProcessPool:
            raise WorkerDied(f"a voting worker died (killed, e.g. by the out-of-memory killer) while voting on "
                             f"{len(jobs)} questions; nothing written: rerun with fewer --workers or more "
                             "memory") from None
    else:
        votes = [_vote(j) for _, j in jobs]
    return jobs, votes


def _select(groups, jobs, votes, num_inputs, *, group_size, min_agreement, seed, drops):
    """Drop ties and low agreement (counted in drops); pick each kept question's group_size responses.
    Returns (kept {key: record without its responses}, wanted [per input file {line: (key, slot)}], the
    agreement histogram [10], gold correctness {"voted": [...], "kept": [...]} where the truth is known)."""
    kept, hist, gold_correct = {}, [0] * 10, {"voted": [], "kept": []}
    wanted = [dict() for _ in range(num_inputs)]
    for (key, _), (gold, rewards, correct, _, _) in zip(jobs, votes):
        g = groups[key]
        if gold is None:
            drops["tie"] += 1
            continue
        agreement = sum(rewards) / len(rewards)
        hist[min(int(agreement * 10), 9)] += 1
        if correct is not None:
            gold_correct["voted"].append(correct)
        if agreement < min_agreement:
            drops["low_agreement"] += 1
            continue
        if correct is not None:
            gold_correct["kept"].append(correct)
        pick = sorted(random.Random(f"{seed}:{key}").sample(range(len(rewards)), group_size))
        for slot, i in enumerate(pick):
            wanted[g["samples"][i][2]][g["samples"][i][3]] = (key, slot)
        kept_rewards = [rewards[i] for i in pick]
        rec = {"id": hashlib.sha1(key.encode()).hexdigest()[:16], "question": g["question"],
               "responses": [None] * group_size, "rewards": kept_rewards, "gold": gold,
               "agreement": agreement, "all_positive": all(r > 0 for r in kept_rewards),
               "difficulty": g["difficulty"], "source": g["source"]}
        if g["dag"] is not None:
            rec["dag"] = g["dag"]
        kept[key] = rec
    return kept, wanted, hist, gold_correct


def _write_kept(inputs, output, kept, wanted):
    """Second pass: fetch the kept responses and write the records to <output>.tmp, renamed to output at the end.
    Empties `kept`. Memory stays bounded whatever the row order (a question's samples may be spread over the
    whole file): each picked response is spilled to a temporary file next to the output as it is read, only its
    (offset, length) is held, and once the pass is over each record is assembled from the spill file, one at a
    time, in the order its last response was read (for contiguous groups: the input's question order)."""
    offsets = {key: [None] * len(rec["responses"]) for key, rec in kept.items()}
    missing = {key: len(rec["responses"]) for key, rec in kept.items()}
    order = []  # keys in the order their last picked response was read
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(output))) as spill:
        for fi, line_no, row in iter_raw_rows(inputs, MalformedCounter(), wanted):
            key, slot = wanted[fi][line_no]
            data = parse_row(row)[1][1].encode("utf-8")
            offsets[key][slot] = (spill.tell(), len(data))
            spill.write(data)
            missing[key] -= 1
            if missing[key] == 0:
                order.append(key)
        assert len(order) == len(kept), "second pass missed responses"
        with open(output + ".tmp", "w") as f:
            for key in order:
                rec = kept.pop(key)
                for slot, (offset, length) in enumerate(offsets.pop(key)):
                    spill.seek(offset)
                    rec["responses"][slot] = spill.read(length).decode("utf-8")
                f.write(json.dumps(rec) + "\n")
    os.replace(output + ".tmp", output)


def _true_answer(dag):
    from synthetic import Problem
    return str(Problem.from_dict(dag).answer)


# --------------------------------------------------------------------------- report

def format_report(report):
    lines = [f"rows read {report['rows_read']}, malformed {report['rows_malformed']}, "
             f"not math {report['rows_not_math']}, no domain field {report['rows_no_domain']}"]
    lines += [f"  malformed {r}: {e['count']} (first at {e['first']})" for r, e in sorted(report["malformed"].items())]
    lines.append(f"questions read {report['questions_read']}, kept {report['questions_kept']}, dropped "
                 + ", ".join(f"{r} {n}" for r, n in report["dropped"].items()))
    lines.append(f"all-positive groups {report['all_positive_share']:.1%} of kept")
    lines.append(f"grading budget: {report['comparisons_string_only']} comparisons of degenerate answers as strings "
                 f"only, {report['votes_over_budget']} votes past their time budget")
    lines.append("agreement (questions with a majority):")
    top = max(report["agreement_histogram"].values()) or 1
    lines += [f"  {b:<10} {n:>6} {'#' * round(40 * n / top)}" for b, n in report["agreement_histogram"].items()]
    if "majority_accuracy" in report:
        acc = report["majority_accuracy"]
        lines.append("majority label correct vs ground truth: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in acc.items() if v is not None))
    return "\n".join(lines)


def main(argv=None):
    """Parse the curate arguments, run curate(), print the report."""
    command = "curate.py"
    ap = cli.ArgumentParser(prog=command, command=command,
                            description="OpenThoughts3 rows (JSONL/parquet) -> curated groups JSONL")
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group-size", type=int, default=8, help="responses kept per question")
    ap.add_argument("--min-samples", type=int, default=None, help="drop questions with fewer (default: group size)")
    ap.add_argument("--min-agreement", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="voting processes")
    args = ap.parse_args(argv)
    check_args(args, command)
    try:
        report = curate(args.input, args.output, group_size=args.group_size, min_samples=args.min_samples,
                        min_agreement=args.min_agreement, seed=args.seed, workers=args.workers)
    except DataError as e:
        cli.fail(command, e)
    except WorkerDied as e:
        sys.exit(f"{command}: error: {e}")
    print(format_report(report))
    print(f"wrote {args.output} and {args.output}.report.json")


def check_args(args, command):
    """The CLI's checks before any row is read (module docstring); one line and exit 2 on the first that fails."""
    def bad(message):
        cli.fail(command, message)

    if args.group_size < 1:
        bad(f"--group-size {args.group_size}: must be >= 1")
    if args.min_samples is not None and args.min_samples < args.group_size:
        bad(f"--min-samples {args.min_samples}: must be >= --group-size ({args.group_size})")
    if not 0 <= args.min_agreement <= 1:
        bad(f"--min-agreement {args.min_agreement:g}: must be in [0, 1]")
    if args.workers < 1:
        bad(f"--workers {args.workers}: must be >= 1")
    for path in args.input:
        if not os.path.isfile(path):
            bad(f"--input {path}: {'is a directory' if os.path.isdir(path) else 'no such file'} (give OpenThoughts3 "
                "rows as .jsonl or .parquet files)")
    for path in (args.output, f"{args.output}.report.json"):
        why = cli.unwritable(path)
        if why:
            bad(f"--output {args.output}: cannot be written: {why}")
    if any(os.path.exists(args.output) and os.path.samefile(args.output, p) for p in args.input):
        bad(f"--output {args.output} is also an --input; write the curated records elsewhere")


if __name__ == "__main__":
    main()
