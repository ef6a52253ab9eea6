"""Data: reading curated records, difficulty-aware sampling, tokenisation, batching (the training side).

Flow: raw rows --curate.py--> curated JSONL (one record per question) --read_records--> records
--GroupDataset--> token groups (optionally a drawn subset: draw_questions) --GroupSampler + collate--> batches.

Curated record (one JSONL line per question):
    {"id", "question", "responses": [G str], "rewards": [G float], "gold": str | null,
     "agreement": float, "all_positive": bool, "difficulty": int | null, "source": str | null, "dag"?: {...}}

Malformed-input rule (raw rows and curated records alike, jsonl_io.py): a malformed line is skipped and
counted by reason, with the first offending file:line named; if more than 1% of the non-blank lines are
malformed the read aborts with DataError (train.py prints its one-line message, no traceback, exit 2).
Curation is `python curate.py` (curate.py imports nothing from here; both read through jsonl_io.py).
Sections: curated records (read_records, sampling_weights, read_pass_rates) | tokenisation and batching
(GroupDataset, collate) | sampling (draw_questions, GroupSampler).
"""
import json

import numpy as np
import torch

from jsonl_io import DataError, MalformedCounter, iter_json_lines, print0  # noqa: F401 (DataError: data.DataError)

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


HEAVY_KEYS = ("question", "responses", "dag")  # what read_records(index_only=True) leaves out


def read_records(path, *, index_only=False):
    """Read a curated JSONL file -> list of records (schema in the module docstring).

    index_only: keep only what the question draw needs (id, rewards, gold, agreement, difficulty, source...),
    without HEAVY_KEYS, plus "_line" (the record's line number, for read_lines) and "num_responses": one
    streaming pass whose memory grows with the number of questions, not with their texts.
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
        if index_only:
            rec = {**{k: v for k, v in rec.items() if k not in HEAVY_KEYS}, "_line": line_no,
                   "num_responses": len(rec["responses"])}
        records.append(rec)
    counter.check(f"read_records({path})")
    if counter.num_malformed:
        print0(f"read_records: skipped {counter.num_malformed}/{counter.total} malformed lines: {counter.reasons}")
    return records


def read_lines(path, line_nos):
    """The full records at the given line numbers (from read_records(index_only=True)'s "_line"), in file order;
    the lines were validated by the index pass."""
    return [rec for _, rec in iter_json_lines(path, MalformedCounter(), wanted=set(line_nos))]


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


def read_pass_rates(path):
    """{question_id: pass rate in [0, 1]} from a JSON file (for sampling_weights)."""
    with open(path) as f:
        rates = json.load(f)
    if not isinstance(rates, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in rates.values()):
        raise DataError(f"{path}: expected a JSON object {{question_id: rate in [0, 1]}}")
    return {str(k): float(v) for k, v in rates.items()}


# --------------------------------------------------------------------------- tokenisation and batching

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
    A sequence longer than max_len is, with overlong="truncate" (the released script's choice), cut to its first
    max_len tokens (the loss covers the kept response tokens, the reward stays: the answer was graded on the
    whole trace), or with "drop" left out; both counted. A prompt that leaves no response token within max_len
    is dropped either way. A question keeps its first group_size usable responses, or is dropped (counted) if
    fewer remain. Ids are stored as int32 arrays (memory at real scale).
    Tokenisation goes through apply_chat_template in batches of questions (one call per batch, not per
    response: the per-call overhead dominated), keeping its handling of special-token text in content.
    """

    def __init__(self, records, tokenizer, *, group_size, max_len, overlong="truncate", end_of_turn="<|im_end|>",
                 batch=256):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be truncate or drop, got {overlong!r}")
        eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if eot_id is None or eot_id == tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no end-of-turn token {end_of_turn!r}")
        self.group_size, self.max_len = group_size, max_len
        self.items = []  # (record, prompt_len, [int32 arrays of full ids], rewards)
        self.report = {"questions_in": len(records), "questions_kept": 0, "questions_dropped_too_few_fit": 0,
                       "responses_in": sum(len(r["responses"]) for r in records), "responses_dropped_too_long": 0,
                       "responses_truncated": 0, "responses_dropped_prompt_too_long": 0}
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
                        what = ("dropped_prompt_too_long" if len(prompt) >= max_len else  # no response token fits
                                "dropped_too_long" if overlong == "drop" else "truncated")
                        self.report[f"responses_{what}"] += 1
                        if what != "truncated":
                            continue
                        length = max_len
                    if len(seqs) < group_size:  # the first group_size usable responses
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

    def keep(self, indices):
        """Restrict the dataset to the questions at `indices` (data.num_questions' subset), in that order."""
        self.items = [self.items[i] for i in indices]
        self.report["questions_drawn"] = len(self.items)

    def lengths(self, i) -> list[int]:
        """Token counts of question i's responses (prompt + response), without building the item."""
        return [len(s) for s in self.items[i][2]]

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


# --------------------------------------------------------------------------- sampling

def _check_weights(weights, num_questions):
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_questions,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be num_questions finite non-negative numbers")
    return weights


def _weighted_order(weights, rng):
    """Efraimidis-Spirakis weighted order without replacement of the indices with w_i > 0: key_i = u_i^(1/w_i)
    descending, computed as log(u_i)/w_i; its first k entries are a weighted draw of k without replacement."""
    u = 1.0 - rng.random(len(weights))  # in (0, 1]: log(u) finite
    positive = np.flatnonzero(weights > 0)
    log_keys = np.log(u[positive]) / weights[positive]  # log(u^(1/w)), same order as u^(1/w)
    return positive[np.argsort(-log_keys, kind="stable")]


SUBSET_STREAM = int.from_bytes(b"subset", "big")  # draw_questions' rng stream, apart from the sampler's [seed, epoch]


def draw_order(num_questions, k, *, seed, weights=None):
    """The draw's whole order (draw_questions' first k are the subset; the rest its replacements, in turn):
    the positive-weight indices by _weighted_order with numpy.random.default_rng([seed, SUBSET_STREAM]).
    k above the number of positive-weight questions raises DataError."""
    weights = np.ones(num_questions) if weights is None else _check_weights(weights, num_questions)
    positive = int(np.count_nonzero(weights > 0))
    if not 1 <= k <= positive:
        raise DataError(f"num_questions {k} not in [1, {positive}] ({positive} questions have a positive weight)")
    return [int(i) for i in _weighted_order(weights, np.random.default_rng([seed, SUBSET_STREAM]))]


def draw_questions(num_questions, k, *, seed, weights=None):
    """k distinct question indices (data.num_questions: the blog's ~2,000), drawn without replacement by
    `weights` (sampling_weights; None = uniform) with numpy.random.default_rng([seed, SUBSET_STREAM]): no rank
    in it, so every rank and world size draws the same subset. A weight-0 question is never drawn; k above the
    number of positive-weight questions raises DataError. Returned sorted: the draw decides which questions,
    the order they are trained in is GroupSampler's (a fresh permutation each epoch)."""
    return sorted(draw_order(num_questions, k, seed=seed, weights=weights)[:k])


def tokenise_drawn(path, index, order, k, tokenizer, **dataset_kw):
    """Tokenise only the drawn questions: the first k usable ones of `order` (draw_order over `index`, the
    read_records(index_only=True) list). A drawn question that turns out unusable (fewer than group_size
    responses fit) is replaced by the next in the order, deterministically, and counted ("drawn_replaced");
    one with fewer than group_size responses at all is passed over without reading it. Returns
    (GroupDataset of the kept questions in index order, their sorted indices)."""
    group_size = dataset_kw["group_size"]
    full, order = order, [i for i in order if index[i]["num_responses"] >= group_size]
    kept, report, pos = {}, {}, 0  # kept: index -> GroupDataset item
    while len(kept) < k and pos < len(order):
        take, pos = order[pos:pos + k - len(kept)], pos + k - len(kept)
        part = GroupDataset(read_lines(path, [index[i]["_line"] for i in take]), tokenizer, **dataset_kw)
        of_id = {index[i]["id"]: i for i in take}
        kept.update({of_id[item[0]["id"]]: item for item in part.items})
        report = {key: report.get(key, 0) + v for key, v in part.report.items()}
    if len(kept) < k:
        raise DataError(f"{path}: only {len(kept)} of the drawn questions keep data.group_size={group_size} "
                        f"responses, below num_questions {k}")
    chosen = sorted(kept)
    dataset = GroupDataset([], tokenizer, **dataset_kw)
    dataset.items, dataset.report = [kept[i] for i in chosen], report
    consumed = full.index(order[min(pos, len(order)) - 1]) + 1  # how far into the draw's order it went
    dataset.report.update(questions_kept=k, questions_drawn=k, drawn_replaced=consumed - k)
    return dataset, chosen


class GroupSampler:
    """Deterministic, resumable, rank-sharded question sampler.

    The question stream is the concatenation of per-epoch permutations; epoch e's permutation comes from
    numpy.random.default_rng([seed, e]): uniform without weights; with weights, _weighted_order (Efraimidis-
    Spirakis) -- a weight-0 question is never drawn and an epoch holds only positive-weight questions.
    Global step s is the next questions_per_step entries of the stream; when an epoch runs out mid-step the
    step continues into the next epoch's permutation (so a step may then repeat a question).
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
            weights = _check_weights(weights, num_questions)
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
            self._perm = (rng.permutation(self.num_questions) if self.weights is None
                          else _weighted_order(self.weights, rng))
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


def write_questions(path: str, records: list[dict], chosen: list[int], weights) -> None:
    """The drawn subset (data.num_questions) as JSONL, one line per question: id, weight, agreement, difficulty."""
    with open(path, "w") as f:
        for i in chosen:
            rec = records[i]
            f.write(json.dumps({"id": rec["id"], "weight": 1.0 if weights is None else weights[i],
                                "agreement": rec["agreement"], "difficulty": rec["difficulty"]}) + "\n")


if __name__ == "__main__":  # the command of the earlier README: curation moved to curate.py
    import sys
    print(f"data.py: error: data.py is no command; curate with `python curate.py {' '.join(sys.argv[2:])}`"
          " (python curate.py -h for usage)", file=sys.stderr)
    sys.exit(2)
