"""Data: OpenThoughts3 reading, curation into groups, difficulty-aware sampling, tokenisation, batching.

Flow: raw rows (JSONL/parquet) --curate--> curated JSONL (one record per question) --read_records-->
records --GroupDataset--> token groups --GroupSampler + collate--> batches for train.py.

Curated record (one JSONL line per question):
    {"id", "question", "responses": [G str], "rewards": [G float], "gold": str | null,
     "agreement": float, "all_positive": bool, "difficulty": int | null, "source": str | null, "dag"?: {...}}

Malformed-input rule (raw rows and curated records alike): a malformed line is skipped and counted by
reason, with the first offending file:line named; if more than 1% of the non-blank lines are malformed the
read aborts with DataError (the CLI prints its one-line message, no traceback, and exits with status 2).

CLI:  python data.py curate --input RAW.jsonl|RAW.parquet [...] --output CURATED.jsonl [--group-size 8]
          [--min-samples G] [--min-agreement 0.5] [--seed 0] [--workers N]      (rules: curate())
Sections: curated records (read_records, sampling_weights) | tokenisation and batching (GroupDataset,
collate, GroupSampler) | raw OpenThoughts3 rows (parse_row) | curation (curate, CLI).
"""
import argparse
import hashlib
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import torch

MAX_MALFORMED_FRACTION = 0.01


class DataError(Exception):
    """Input data unusable as a whole (too many malformed lines, no rows, a broken chat template)."""


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


class MalformedCounter:
    """Counts skipped lines by reason and remembers the first offending file:line of each reason."""

    def __init__(self):
        self.total = 0  # non-blank lines seen
        self.reasons = {}  # reason -> {"count": int, "first": "file:line"}

    def bad(self, reason, where):
        entry = self.reasons.setdefault(reason, {"count": 0, "first": where})
        entry["count"] += 1

    @property
    def num_malformed(self):
        return sum(e["count"] for e in self.reasons.values())

    def check(self, what):
        """Raise DataError when nothing was read or more than MAX_MALFORMED_FRACTION of lines are malformed."""
        if self.total == 0:
            raise DataError(f"{what}: no rows read")
        if self.num_malformed > MAX_MALFORMED_FRACTION * self.total:
            detail = ", ".join(f"{r} x{e['count']} (first at {e['first']})" for r, e in sorted(self.reasons.items()))
            raise DataError(f"{what}: {self.num_malformed}/{self.total} lines malformed "
                            f"(> {MAX_MALFORMED_FRACTION:.0%}): {detail}")


def iter_json_lines(path, counter, wanted=None):
    """Yield (line_no, obj) for each non-blank line of a JSONL file that decodes to a JSON object.

    Bytes are decoded strictly as UTF-8 (invalid bytes -> reason "non_utf8"). With `wanted` (a set of line
    numbers) other lines are neither decoded nor counted (the second curation pass)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if wanted is not None:
                if line_no in wanted:
                    yield line_no, json.loads(raw)
                continue
            if not raw.strip():
                continue
            counter.total += 1
            try:
                obj, reason = json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError:
                reason = "non_utf8"
            except json.JSONDecodeError:
                reason = "bad_json"
            if reason is None and not isinstance(obj, dict):
                reason = "not_object"
            if reason is not None:
                counter.bad(reason, f"{path}:{line_no}")
                continue
            yield line_no, obj


# --------------------------------------------------------------------------- curated records (training side)

def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


RECORD_SCHEMA = {  # curated record key -> check of its value
    "id": lambda v: isinstance(v, str),
    "question": lambda v: isinstance(v, str) and v.strip() != "",
    "responses": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(r, str) and r for r in v),
    "rewards": lambda v: isinstance(v, list) and all(_num(r) for r in v),
    "gold": lambda v: v is None or isinstance(v, str),
    "agreement": lambda v: _num(v) and 0.0 <= v <= 1.0,
    "all_positive": lambda v: isinstance(v, bool),
    "difficulty": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "source": lambda v: v is None or isinstance(v, str),
    "dag": lambda v: isinstance(v, dict),  # optional key
}


def validate_record(rec):
    """None if `rec` follows the curated schema, else the reason ("missing_<key>" / "bad_<key>")."""
    for key, ok in RECORD_SCHEMA.items():
        if key not in rec and key != "dag":
            return f"missing_{key}"
        if key in rec and not ok(rec[key]):
            return f"bad_{key}"
    return None if len(rec["rewards"]) == len(rec["responses"]) else "bad_rewards"


def read_records(path):
    """Read a curated JSONL file -> list of records (schema in the module docstring).

    Malformed lines (bad JSON, non-UTF-8, schema violations, duplicate ids) are skipped and counted; a
    one-line summary is printed (rank 0) when any were; more than 1% malformed raises DataError."""
    counter, records, seen = MalformedCounter(), [], set()
    for line_no, rec in iter_json_lines(path, counter):
        reason = validate_record(rec)
        if reason is None and rec["id"] in seen:
            reason = "duplicate_id"
        if reason is not None:
            counter.bad(reason, f"{path}:{line_no}")
            continue
        seen.add(rec["id"])
        records.append(rec)
    counter.check(f"read_records({path})")
    if counter.num_malformed:
        print0(f"read_records: skipped {counter.num_malformed}/{counter.total} malformed lines: {counter.reasons}")
    return records


def sampling_weights(records, *, agreement_weights, difficulty_weights, pass_rates=None, pass_rate_band=(0.0, 1.0)):
    """Per-question sampling weight (for GroupSampler):

        w(q) = w_agreement(bucket(agreement_q)) * w_difficulty(difficulty_q) * f(pass_rate_q)

    - agreement_weights: {lower_bound: weight} (keys floats or numeric strings, e.g. {0.5: 1, 0.75: 1, 1.0: 0.5});
      the bucket of an agreement a is the largest lower bound <= a, so the example reads [0.5, 0.75) -> 1,
      [0.75, 1.0) -> 1, exactly 1.0 -> 0.5. An agreement below every bound raises DataError.
      None: factor 1 for every question.
    - difficulty_weights: {difficulty: weight} (keys compared as str(int)); a question whose difficulty is
      null or not listed gets factor 1. None: factor 1 for every question.
    - pass_rates: {question_id: student pass rate in [0, 1]} from an eval run, with band (low, high):
          f(rate) = 0                      if rate >= high   (the student already solves it: no signal)
          f(rate) = 1 - max(rate, low)     otherwise        (rarer success -> larger weight, capped at 1 - low)
      Questions missing from pass_rates are treated as rate 0 (never seen solved): f = 1 - low.
      pass_rates that match none of the records raise DataError (an id mismatch, not a choice).
      None: factor 1 for every question.
    """
    low, high = pass_rate_band
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"pass_rate_band must satisfy 0 <= low < high <= 1, got {pass_rate_band}")
    bounds = None
    if agreement_weights is not None:
        bounds = sorted((float(k), float(w)) for k, w in agreement_weights.items())
    diff_w = None if difficulty_weights is None else {str(int(k)): float(w) for k, w in difficulty_weights.items()}
    if pass_rates is not None and not any(r["id"] in pass_rates for r in records):
        raise DataError("pass_rates: none of the question ids match the records")
    weights = []
    for rec in records:
        w = 1.0
        if bounds is not None:
            below = [bw for b, bw in bounds if b <= rec["agreement"]]
            if not below:
                raise DataError(f"question {rec['id']}: agreement {rec['agreement']} below every bucket {bounds}")
            w *= below[-1]
        if diff_w is not None and rec["difficulty"] is not None:
            w *= diff_w[str(rec["difficulty"])] if str(rec["difficulty"]) in diff_w else 1.0
        if pass_rates is not None:
            rate = float(pass_rates[rec["id"]]) if rec["id"] in pass_rates else 0.0
            w *= 0.0 if rate >= high else 1.0 - max(rate, low)
        weights.append(w)
    return weights


def _batch_ids(encoded):
    """apply_chat_template(batch, tokenize=True) returns lists in transformers 4 and a BatchEncoding in 5."""
    return [list(ids) for ids in (encoded if isinstance(encoded, list) else encoded["input_ids"])]


class GroupDataset:
    """Tokenised question groups.

    prompt ids = chat_template([user: question], add_generation_prompt=True); full ids = chat_template(
    [user: question, assistant: response]). The prompt must be a prefix of the full ids (else DataError:
    the template rewrites earlier turns or merges tokens across the boundary, and the mask would be wrong).
    The response ends at the LAST end-of-turn token (default "<|im_end|>") of the full ids; everything the
    template appends after it (ChatML's trailing "\\n") is cut, because generation stops at the end-of-turn
    token, so the model never produces those tokens and must not be trained on them. Hence
        input_ids = prompt + response + <|im_end|>,  loss_mask = 0 on the prompt, 1 on the rest.
    Sequences longer than max_len are dropped (counted); a question keeps its first group_size fitting
    responses, or is dropped (counted) if fewer fit. Ids are stored as int32 arrays (memory at real scale).
    Tokenisation goes through apply_chat_template in batches of questions (one call per batch, not per
    response: the per-call overhead dominated), keeping its handling of special-token text in content.
    """

    def __init__(self, records, tokenizer, *, group_size, max_len, end_of_turn="<|im_end|>", batch=256):
        eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if eot_id is None or eot_id == tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no end-of-turn token {end_of_turn!r}")
        self.group_size, self.max_len = group_size, max_len
        self.items = []  # (record, prompt_len, [int32 arrays of full ids], rewards)
        self.report = {"questions_in": len(records), "questions_kept": 0, "questions_dropped_too_few_fit": 0,
                       "responses_in": sum(len(r["responses"]) for r in records), "responses_dropped_too_long": 0}
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            users = [{"role": "user", "content": rec["question"]} for rec in chunk]
            prompts = _batch_ids(tokenizer.apply_chat_template([[u] for u in users], add_generation_prompt=True,
                                                               tokenize=True))
            fulls = iter(_batch_ids(tokenizer.apply_chat_template(
                [[u, {"role": "assistant", "content": r}] for u, rec in zip(users, chunk) for r in rec["responses"]],
                tokenize=True)))
            for rec, prompt in zip(chunk, prompts):
                seqs, rewards = [], []
                for reward, full in zip(rec["rewards"], [next(fulls) for _ in rec["responses"]]):
                    if full[:len(prompt)] != prompt:  # (list comparison, before the array conversion)
                        raise DataError(f"question {rec['id']}: the chat template's prompt is not a prefix of "
                                        "prompt+response; the loss mask cannot be placed")
                    full = np.asarray(full, dtype=np.int32)
                    ends = np.flatnonzero(full[len(prompt):] == eot_id)
                    if len(ends) == 0:
                        raise DataError(f"question {rec['id']}: no {end_of_turn!r} after the prompt")
                    length = len(prompt) + int(ends[-1]) + 1  # through the last end-of-turn token
                    if length > max_len:
                        self.report["responses_dropped_too_long"] += 1
                    elif len(seqs) < group_size:  # the first group_size fitting responses
                        seqs.append(full[:length])
                        rewards.append(float(reward))
                if len(seqs) < group_size:
                    self.report["questions_dropped_too_few_fit"] += 1
                else:
                    self.items.append((rec, len(prompt), seqs, rewards))
        self.report["questions_kept"] = len(self.items)

    @property
    def records(self):
        """The kept questions' records, index-aligned with the dataset (for sampling_weights)."""
        return [rec for rec, _, _, _ in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rec, prompt_len, seqs, rewards = self.items[i]
        return dict(input_ids=[s.tolist() for s in seqs],
                    loss_mask=[[0] * prompt_len + [1] * (len(s) - prompt_len) for s in seqs],
                    rewards=list(rewards), prompt_ids=seqs[0][:prompt_len].tolist(),
                    question_id=rec["id"], gold=rec["gold"])


def collate(items, pad_id):
    """Items -> right-padded tensors; rows are item0's group, then item1's group, ... (B = sum of groups).

    input_ids [B, T] long (pad_id after the end), attention_mask [B, T] long, loss_mask [B, T] float aligned
    with input_ids (train shifts: targets input_ids[:, 1:], mask loss_mask[:, 1:]), rewards [B] float."""
    rows = [(ids, m) for it in items for ids, m in zip(it["input_ids"], it["loss_mask"])]
    B, T = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    for b, (ids, m) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
        loss_mask[b, :len(m)] = torch.tensor(m, dtype=torch.float32)
    rewards = torch.tensor([r for it in items for r in it["rewards"]], dtype=torch.float32)  # [B]
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, rewards=rewards)


class GroupSampler:
    """Deterministic, resumable, rank-sharded question sampler.

    The question stream is the concatenation of per-epoch permutations; epoch e's permutation comes from
    numpy.random.default_rng([seed, e]): uniform without weights; with weights, the Efraimidis-Spirakis
    weighted order without replacement (key_i = u_i^(1/w_i), descending; computed as log(u_i)/w_i) over the
    questions with w_i > 0 -- a weight-0 question is never drawn and an epoch holds only positive-weight
    questions. Global step s is the next questions_per_step entries of the stream; when an epoch runs out
    mid-step the step continues into the next epoch's permutation (so a step may then repeat a question).
    Rank r gets chunk[r::world_size], so the global step's questions never depend on world_size.
    State (resumable): epoch and position of the next draw; .epoch is the epoch the next step starts in
    and .progress the fractional epoch count (for logging).
    """

    def __init__(self, num_questions, questions_per_step, *, rank, world_size, seed, weights=None):
        if questions_per_step % world_size != 0:
            raise ValueError(f"questions_per_step {questions_per_step} not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (num_questions,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
                raise ValueError("weights must be num_questions finite non-negative numbers")
            if not np.any(weights > 0):
                raise ValueError("all sampling weights are 0")
        elif num_questions == 0:
            raise ValueError("no questions to sample")
        self.num_questions, self.questions_per_step = num_questions, questions_per_step
        self.rank, self.world_size, self.seed, self.weights = rank, world_size, seed, weights
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch):
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.weights is None:
                self._perm = rng.permutation(self.num_questions)
            else:
                u = 1.0 - rng.random(self.num_questions)  # in (0, 1]: log(u) finite
                positive = np.flatnonzero(self.weights > 0)
                log_keys = np.log(u[positive]) / self.weights[positive]  # log(u^(1/w)), same order as u^(1/w)
                self._perm = positive[np.argsort(-log_keys, kind="stable")]
            self._perm_epoch = epoch
        return self._perm

    @property
    def progress(self):
        return self.epoch + self.position / len(self.permutation(self.epoch))

    def next_step(self):
        """This rank's question indices for the next global step."""
        chunk = []
        while len(chunk) < self.questions_per_step:
            perm = self.permutation(self.epoch)
            take = perm[self.position:self.position + self.questions_per_step - len(chunk)]
            chunk.extend(int(i) for i in take)
            self.position += len(take)
            if self.position == len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return chunk[self.rank::self.world_size]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


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
    """Pool worker: (answers, true_answer | None) -> (gold, rewards, gold_correct | None)."""
    from reward import answers_equivalent, majority_vote
    answers, truth = job
    gold, rewards = majority_vote(answers)
    return gold, rewards, None if truth is None or gold is None else answers_equivalent(gold, truth)


def curate(inputs, output, *, group_size=8, min_samples=None, min_agreement=0.5, seed=0, workers=1):
    """Raw rows -> curated JSONL (one record per question) + <output>.report.json; returns the report.

    1. read rows (parse_row), group math rows by whitespace-normalised question text;
    2. answers = extract_answer(response); gold, rewards = majority_vote(all answers of the question)
       (math-verify equivalence clusters; equal strings short-circuit in answers_equivalent);
       agreement = |majority cluster| / #samples (unanswered samples count in the denominator);
    3. drop questions, in this order: fewer than min_samples (default group_size) samples, no boxed
       answer in any sample, a tie for the majority (gold None), agreement < min_agreement;
    4. keep group_size responses: a random subset from random.Random(f"{seed}:{question key}") over the
       samples sorted by response hash -- deterministic given the seed and the samples, not file order;
       all_positive = every kept reward > 0.
    Two passes over the inputs (answers and line numbers first, kept responses second) keep memory small.
    """
    from reward import extract_answer
    min_samples = group_size if min_samples is None else min_samples
    if min_samples < group_size:
        raise ValueError(f"min_samples {min_samples} < group_size {group_size}")
    counter, groups, skipped = MalformedCounter(), {}, Counter()
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
            g["samples"].append((digest, extract_answer(response), fi, line_no))
    counter.check("curate")
    drops = Counter({"too_few_samples": 0, "no_boxed_answer": 0, "tie": 0, "low_agreement": 0})
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
        import multiprocessing
        with multiprocessing.Pool(workers) as pool:
            votes = pool.map(_vote, [j for _, j in jobs], chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        votes = [_vote(j) for _, j in jobs]
    kept, hist, gold_correct = {}, [0] * 10, {"voted": [], "kept": []}  # kept: key -> record skeleton
    wanted = [dict() for _ in inputs]  # file index -> {line_no: (key, slot)}
    for (key, _), (gold, rewards, correct) in zip(jobs, votes):
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
    num_kept, num_all_positive = len(kept), sum(r["all_positive"] for r in kept.values())
    with open(output, "w") as f:  # second pass: fetch the kept responses, write each question when complete
        for fi, line_no, row in iter_raw_rows(inputs, MalformedCounter(), wanted):
            key, slot = wanted[fi][line_no]
            rec = kept[key]
            rec["responses"][slot] = parse_row(row)[1][1]
            if all(r is not None for r in rec["responses"]):
                f.write(json.dumps(kept.pop(key)) + "\n")
    assert not kept, "second pass missed responses"
    report = {"inputs": [str(p) for p in inputs], "output": str(output),
              "settings": {"group_size": group_size, "min_samples": min_samples, "min_agreement": min_agreement,
                           "seed": seed},
              "rows_read": counter.total, "rows_malformed": counter.num_malformed, "malformed": counter.reasons,
              "rows_not_math": skipped["rows_not_math"], "rows_no_domain": skipped["rows_no_domain"],
              "questions_read": len(groups), "questions_kept": num_kept, "dropped": dict(drops),
              "all_positive_share": num_all_positive / num_kept if num_kept else 0.0,
              "agreement_histogram": {f"[{i / 10:.1f},{(i + 1) / 10:.1f}{']' if i == 9 else ')'}": n
                                      for i, n in enumerate(hist)}}
    if gold_correct["voted"]:  # synthetic task: majority label vs the ground truth
        report["majority_accuracy"] = {k: sum(v) / len(v) if v else None for k, v in gold_correct.items()}
    with open(f"{output}.report.json", "w") as f:
        json.dump(report, f, indent=1)
    return report


def _true_answer(dag):
    from synthetic import Problem
    return str(Problem.from_dict(dag).answer)


def format_report(report):
    lines = [f"rows read {report['rows_read']}, malformed {report['rows_malformed']}, "
             f"not math {report['rows_not_math']}, no domain field {report['rows_no_domain']}"]
    lines += [f"  malformed {r}: {e['count']} (first at {e['first']})" for r, e in sorted(report["malformed"].items())]
    lines.append(f"questions read {report['questions_read']}, kept {report['questions_kept']}, dropped "
                 + ", ".join(f"{r} {n}" for r, n in report["dropped"].items()))
    lines.append(f"all-positive groups {report['all_positive_share']:.1%} of kept")
    lines.append("agreement (questions with a majority):")
    top = max(report["agreement_histogram"].values()) or 1
    lines += [f"  {b:<10} {n:>6} {'#' * round(40 * n / top)}" for b, n in report["agreement_histogram"].items()]
    if "majority_accuracy" in report:
        acc = report["majority_accuracy"]
        lines.append("majority label correct vs ground truth: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in acc.items() if v is not None))
    return "\n".join(lines)


def read_pass_rates(path):
    """{question_id: pass rate in [0, 1]} from a JSON file (for sampling_weights)."""
    with open(path) as f:
        rates = json.load(f)
    if not isinstance(rates, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in rates.values()):
        raise DataError(f"{path}: expected a JSON object {{question_id: rate in [0, 1]}}")
    return {str(k): float(v) for k, v in rates.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="offgrpo data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curate", help="OpenThoughts3 rows (JSONL/parquet) -> curated groups JSONL")
    c.add_argument("--input", nargs="+", required=True)
    c.add_argument("--output", required=True)
    c.add_argument("--group-size", type=int, default=8, help="responses kept per question")
    c.add_argument("--min-samples", type=int, default=None, help="drop questions with fewer (default: group size)")
    c.add_argument("--min-agreement", type=float, default=0.5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="voting processes")
    args = ap.parse_args(argv)
    try:
        report = curate(args.input, args.output, group_size=args.group_size, min_samples=args.min_samples,
                        min_agreement=args.min_agreement, seed=args.seed, workers=args.workers)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report))
    print(f"wrote {args.output} and {args.output}.report.json")


if __name__ == "__main__":
    main()
