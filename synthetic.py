"""The tiny lab's task: modular arithmetic over a random DAG, with traces, a simulated teacher,
a process reward and a character-level tokenizer.  `python synthetic.py` writes data/tiny/.

Problem (difficulty k = number of operations). Variables v_1..v_k with
    v_i = x_i op_i y_i  (mod m),  op_i in {+, -, *},
v_1 reads two constants; v_i (i > 1) reads v_{i-1} and either a constant or (prob 1/2, i >= 3) a
random earlier variable, so the target v_k depends on every node and exactly k steps are needed.
Names follow the dependency order (a, b, c, ...); the question lists the assignments shuffled:
    "Mod 5: c=b*4, a=3+4, b=a+2. Find c."
Trace (the real teacher's layout; compact because the tokenizer is character-level):
    <think>\nDefine a=3+4=2.\nDefine b=a+2=2+2=4.\nDefine c=b*4=4*4=1.\n</think>\n\\boxed{1}
(operand values are substituted before the result: one lookup, then one table fact per step).

Simulated teacher (16 samples per question). Per question, draw u ~ U(0, 1) and a fixed wrong
value w_j != true_j for every step j (a systematic misconception). The question's per-step error
probability is q = min(1, 4 u^3 p_step_error(k)) (mean p_step_error(k) = 0.03 k); each sample is
"systematic" (prob 1/2: its wrong steps write w_j) or "random" (a uniformly random wrong value).
Later steps compute from the written values, so errors propagate. Default teacher set (512
questions, k = 3, mod 5): all-positive (unanimous) groups 36%, majority label correct 97%, sample
accuracy 81%; after curation (min agreement 0.5) 453 kept, 50% all-positive, majority correct 100%.

Process reward: every "Define v=...=value." step is re-checked against the true DAG value of v.
    fraction = #{nodes whose first step states the true value} / max(k, #steps parsed)
    strict   = fraction == 1   (all k nodes defined once, every one correct)

Calibration (scratch SFT loop: tiny Qwen2 from scratch, AdamW lr 2e-3 betas (0.9, 0.95) wd 0.1,
100 warmup steps, cosine to 0.1 lr, clip 1.0, 32 fresh sequences/step, loss = mean over sequences of
the token-mean over response tokens; greedy accuracy per k on 100 problems; "/" = strict; "fact" /
"copy" = teacher-forced argmax accuracy on result digits / on operands copied from the question):
    setup (800 steps, mid k 1-6 weights 8,8,2,1,.5,.5 unless said)   k=1   k=2   k=3      k=4      k=5, 6
    mod 7, random names                                              1.00  .77   .22/.01  .21/0    .16, .24
    mod 7, ordered names, three runs                                 .99-1 1.00  .26-.99  .18-.31  .15-.20
    mod 7, ordered, 600 of 1200 steps (fact .50 at 300 steps)       .82   .64   .30/.24  .22/.09  .17, .09
    mod 7, ordered, 500 steps, lr 3e-3 / 5e-3                       loss and accuracy worse than 2e-3
    mod 5, ordered, seed 0 (at 400 steps: fact .96, copy .84)       1.00  1.00  .61/.60  .26/.14  .24, .34
    mod 5, ordered, seed 1                                          1.00  1.00  .57/.52  .29/.14  .20, .29
    mod 5, pure chain (no skip edges)                               1.00  1.00  .57/.53  .27/.13  .21, .23
    mod 5, question listed in dependency order                      1.00  1.00  .35/.27  .25/.13  .32, .35
    mod 5, mid weights 2,4,4,4,3,3 / 4,4,3,3,2,2, 600 steps         1.00  .49   .31/.17  .24/.08  .20, .33
Mod 7's 147 table facts are learned slowly and the k = 3 step appears at a run-dependent step (k = 3
from .26 to .99 over three runs); mod 5's 75 facts are learned by ~400 steps, after which copying the
right assignment out of a longer question is what fails, and the result is the same across seeds:
k <= 2 solved, k = 3 at the edge (~.6), k = 4 partly (~.27, strict ~.14), k >= 5 near chance (.2).
Hence the defaults: mod 5, teacher and in-distribution eval k = 3, harder eval k = 4.
Model: Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True):
1,067,648 parameters; chat sequences <= 159 tokens (k = 6). Speed on one otherwise idle 2-core machine:
forward + backward ~5.7k tokens/s per core (matmul-bound); train.py under torchrun, 2 ranks, the model as one
FSDP unit: ~0.38 s per 32-sequence step. launch/demo.sh's base trains 480 steps (one pass over the default
15,360 mid problems; 203 s) to fit the 10-minute demo: with the full schedule in 480 steps it lands at the same
edge, avg@4 at T = 0.6 k = 3 36.5%, k = 4 26.0% (seed 0; README). 400 steps (12,800 problems) is too few:
k = 3 26.8% and k = 4 22.6% (chance 20%, process accuracy 10% / 4%), and no post-training variant then lifted
k = 3 (3 seeds each, measured).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import cli

OPS = "+-*"
VAR_NAMES = "abcdefghijklmnopqrstuvwxyz"
SOURCE = "synthetic-dag"

# Tokenizer: every printable ASCII character plus newline is one token; a few frequent strings
# are single added tokens to shorten sequences (sequence length is the CPU lab's main cost).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ADDED_TOKENS = ["<think>", "</think>", "\\boxed{", "Define", "user", "assistant"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB_SIZE = 128  # model vocab_size (>= len(tokenizer) == 106); a round number for the embedding
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --- problems ---------------------------------------------------------------------------------

def apply_op(op: str, a: int, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown op {op!r}")


@dataclass
class Problem:
    k: int
    modulus: int
    steps: list  # [(var, op, a, b)] in dependency order; a, b are ints (constants) or var names
    target: str
    order: list = field(default_factory=list)  # question's listing order (indices into steps)

    @property
    def values(self) -> dict:
        return evaluate(self.steps, self.modulus)

    @property
    def answer(self) -> int:
        return self.values[self.target]

    @property
    def question(self) -> str:
        order = self.order or list(range(len(self.steps)))
        assigns = ", ".join(f"{v}={a}{op}{b}" for v, op, a, b in (self.steps[i] for i in order))
        return f"Mod {self.modulus}: {assigns}. Find {self.target}."

    def to_dict(self) -> dict:
        return {"k": self.k, "modulus": self.modulus, "steps": [list(s) for s in self.steps],
                "target": self.target, "order": list(self.order), "answer": self.answer}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        p = cls(k=d["k"], modulus=d["modulus"], steps=[tuple(s) for s in d["steps"]],
                target=d["target"], order=list(d["order"]))
        if p.answer != d["answer"]:
            raise ValueError(f"dag's stored answer {d['answer']} disagrees with its steps ({p.answer})")
        return p


def evaluate(steps, modulus: int, overrides: dict | None = None) -> dict:
    """Values of every variable; overrides[var] replaces that node's computed value (used to
    compute where an injected error propagates)."""
    vals: dict = {}
    for var, op, a, b in steps:
        x = vals[a] if isinstance(a, str) else a
        y = vals[b] if isinstance(b, str) else b
        vals[var] = apply_op(op, x, y, modulus)
        if overrides and var in overrides:
            vals[var] = overrides[var] % modulus
    return vals


def make_problem(rng: random.Random, k: int, modulus: int, *, skip_prob: float = 0.5,
                 ordered_names: bool = True) -> Problem:
    """v_1 = c op c'; v_i = v_{i-1} op x (either operand order), x an earlier variable with
    probability skip_prob (i >= 3) else a constant. ordered_names: v_i is the i-th letter (a, b,
    c, ...), else k random distinct letters (then finding the next assignment in the shuffled
    list is the bottleneck: measured at chance for k >= 3, see the calibration table)."""
    assert 1 <= k <= len(VAR_NAMES)
    names = list(VAR_NAMES[:k]) if ordered_names else rng.sample(VAR_NAMES, k)
    steps = []
    for i, var in enumerate(names):
        op = rng.choice(OPS)
        if i == 0:
            a, b = rng.randrange(modulus), rng.randrange(modulus)
        else:
            # the chain edge v_{i-1} keeps every node an ancestor of the target
            other = names[rng.randrange(i - 1)] if i >= 2 and rng.random() < skip_prob else rng.randrange(modulus)
            a, b = (names[i - 1], other) if rng.random() < 0.5 else (other, names[i - 1])
        steps.append((var, op, a, b))
    order = list(range(k))
    rng.shuffle(order)
    return Problem(k=k, modulus=modulus, steps=steps, target=names[-1], order=order)


# --- traces -----------------------------------------------------------------------------------

def render_trace(problem: Problem, errors: dict | None = None) -> str:
    """Trace in dependency order. errors[var] = value the writer states for that step instead of
    the right result of its (written) operands; later steps use the written values."""
    errors = errors or {}
    written: dict = {}
    lines = []
    for var, op, a, b in problem.steps:
        x = written[a] if isinstance(a, str) else a
        y = written[b] if isinstance(b, str) else b
        result = errors[var] if var in errors else apply_op(op, x, y, problem.modulus)
        written[var] = result
        if isinstance(a, str) or isinstance(b, str):
            lines.append(f"Define {var}={a}{op}{b}={x}{op}{y}={result}.")
        else:
            lines.append(f"Define {var}={a}{op}{b}={result}.")
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(written[problem.target]) + "}"


def correct_trace(problem: Problem) -> str:
    return render_trace(problem)


def p_step_error(k: int) -> float:
    """The simulated teacher's mean per-step error probability at difficulty k."""
    return min(0.5, 0.03 * k)


def teacher_traces(problem: Problem, rng: random.Random, n: int, p_error: float) -> list[str]:
    """n samples from the simulated teacher for one question (see the module docstring)."""
    truth = problem.values
    wrong = {v: (truth[v] + rng.randrange(1, problem.modulus)) % problem.modulus
             for v, _, _, _ in problem.steps}
    q = min(1.0, 4.0 * rng.random() ** 3 * p_error)  # E[4 u^3] = 1
    return [teacher_trace(problem, rng, q, wrong if rng.random() < 0.5 else None) for _ in range(n)]


def teacher_trace(problem: Problem, rng: random.Random, p_step_error: float,
                  wrong: dict | None = None) -> str:
    """One sample: each step independently wrong with probability p_step_error. A wrong step
    states wrong[var] if given (and different from the right result of its written operands),
    else a uniformly random different value."""
    m = problem.modulus
    errors: dict = {}
    written: dict = {}
    for var, op, a, b in problem.steps:
        x = written[a] if isinstance(a, str) else a
        y = written[b] if isinstance(b, str) else b
        right = apply_op(op, x, y, m)
        written[var] = right
        if rng.random() < p_step_error:
            bad = wrong[var] if wrong is not None and wrong[var] != right else (right + rng.randrange(1, m)) % m
            errors[var] = written[var] = bad
    return render_trace(problem, errors)


# --- process reward ---------------------------------------------------------------------------

_STEP = re.compile(r"Define ([^\n.]*)\.")


def parse_steps(text: str) -> list[tuple[str, int | None]]:
    """[(var, stated value or None if unparseable)] for every "Define ...." step."""
    out = []
    for body in _STEP.findall(text):
        parts = body.split("=")
        var = parts[0].strip()
        value = parts[-1].strip()
        out.append((var, int(value) if len(parts) >= 2 and value.isdigit() else None))
    return out


def process_reward(problem: Problem, response_text: str) -> tuple[float, bool]:
    truth = problem.values
    steps = parse_steps(response_text)
    first: dict = {}  # var -> value stated at its first occurrence
    for var, value in steps:
        first.setdefault(var, value)
    n_correct = sum(1 for var, value in first.items() if var in truth and value == truth[var])
    frac = n_correct / max(problem.k, len(steps))
    return frac, frac == 1.0


# --- tokenizer --------------------------------------------------------------------------------

def _byte_level(text: str) -> str:
    """GPT-2/Qwen2 byte-level alphabet: printable bytes map to themselves, the others (space, newline, ...)
    to the code points 256+ (' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in table)})
    return "".join(table[b] for b in text.encode("utf-8"))


def build_tokenizer(out_dir):
    """Character-level HF tokenizer with ChatML special tokens and a chat template. It is a byte-level BPE
    without merges -- the format of Qwen2's own tokenizer -- because AutoTokenizer loads a directory whose
    config.json says qwen2 as Qwen2Tokenizer, which rebuilds the byte-level pre-tokenizer: a plain
    character vocabulary would then lose every space and newline (seen with transformers 5.23)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [_byte_level(c) for c in CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=4096)
    hf.chat_template = CHAT_TEMPLATE
    assert len(hf) <= VOCAB_SIZE, (len(hf), VOCAB_SIZE)
    hf.save_pretrained(str(out_dir))
    return hf


# --- data files -------------------------------------------------------------------------------

def _majority(answers: list[str]) -> tuple[str | None, float]:
    counts: dict = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    if len(ranked) > 1 and ranked[0] == ranked[1]:
        return None, ranked[0] / len(answers)
    return max(counts, key=counts.get), ranked[0] / len(answers)


class DrawError(ValueError):
    """Too many distinct problems asked of a k and modulus (the CLI prints it as one line)."""


def _problems(rng, ks, n, modulus, seen: set, weights=None, unique=True) -> list[Problem]:
    """n problems whose k follow `weights` over `ks` (exact counts by largest remainder, uniform
    when None), in random order, none of whose questions is in `seen`; unique=True also keeps
    them distinct from each other and adds them to `seen` (k=1 has only 26*3*m*m questions, so
    the large mid-training set may repeat easy questions, never an eval question)."""
    weights = weights or [1.0] * len(ks)
    quota = [n * w / sum(weights) for w in weights]
    counts = [int(q) for q in quota]
    for i in sorted(range(len(ks)), key=lambda i: counts[i] - quota[i])[: n - sum(counts)]:
        counts[i] += 1
    out = []
    for k, count in zip(ks, counts):
        made = tries = 0
        while made < count:
            tries += 1
            if tries > 100 * count + 10_000:
                raise DrawError(f"cannot draw {count} distinct new problems with k={k}, modulus={modulus}; ask for "
                                "fewer problems, larger k or a larger --modulus")
            p = make_problem(rng, k, modulus)
            if p.question not in seen:
                if unique:
                    seen.add(p.question)
                out.append(p)
                made += 1
    rng.shuffle(out)
    return out


def write_data(out: Path, *, seed: int, modulus: int, mid_k, mid_weights, n_mid: int, teacher_k, n_teacher: int,
               samples: int, eval_id_k, eval_ood_k, n_eval: int, eval_mid_k=(2,),
               teacher_error_scale: float = 1.0) -> dict:
    rng = random.Random(seed)
    seen: set = set()
    # eval, then teacher questions (unique), then mid-training ones: no training question is an eval
    # question and no mid-training question is a teacher question. All drawn before anything is written
    # (a DrawError leaves `out` untouched); the writes below draw only the teacher traces.
    evals = {name: _problems(rng, ks, n_eval, modulus, seen)
             for name, ks in (("eval_id", eval_id_k), ("eval_ood", eval_ood_k))}
    teacher = _problems(rng, teacher_k, n_teacher, modulus, seen)
    mid = _problems(rng, mid_k, n_mid, modulus, seen, mid_weights, unique=False)
    # retention (eval_mid): what mid-training taught, on problems no training set holds. Drawn last, from an rng
    # of its own, so every other file is what it was before eval_mid existed.
    held = seen | {p.question for p in mid}
    evals["eval_mid"] = _problems(random.Random(f"{seed}-eval_mid"), eval_mid_k, n_eval, modulus, held)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer")
    for name, probs in evals.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for i, p in enumerate(probs):
                f.write(json.dumps({"id": f"{name}-{i}", "problem": p.question, "answer": str(p.answer),
                                    "dag": p.to_dict(), "k": p.k}) + "\n")
    with open(out / "mid.jsonl", "w") as f:
        for i, p in enumerate(mid):
            f.write(json.dumps({"id": f"mid-{i}", "question": p.question, "responses": [correct_trace(p)],
                                "rewards": [1.0], "gold": str(p.answer), "agreement": 1.0,
                                "all_positive": True, "difficulty": p.k, "source": SOURCE,
                                "dag": p.to_dict()}) + "\n")
    stats = {"questions": 0, "all_positive": 0, "majority_correct": 0, "sample_correct": 0}
    with open(out / "teacher_raw.jsonl", "w") as f:
        for p in teacher:
            traces = teacher_traces(p, rng, samples, p_step_error(p.k) * teacher_error_scale)
            answers = [t.rsplit("\\boxed{", 1)[1].rstrip("}") for t in traces]
            gold, _ = _majority(answers)
            stats["questions"] += 1
            stats["all_positive"] += len(set(answers)) == 1
            stats["majority_correct"] += gold == str(p.answer)
            stats["sample_correct"] += sum(a == str(p.answer) for a in answers) / samples
            for t in traces:
                f.write(json.dumps({"conversations": [{"from": "human", "value": p.question},
                                                      {"from": "gpt", "value": t}],
                                    "domain": "math", "source": SOURCE, "difficulty": p.k,
                                    "dag": p.to_dict()}) + "\n")
    n = stats.pop("questions")
    return {"teacher_questions": n, **{f"teacher_{key}_share": round(v / n, 4) for key, v in stats.items()}}


def _ks(s: str) -> list[int]:
    """"1-3" -> [1, 2, 3];  "2,4" -> [2, 4]."""
    if "-" in s:
        lo, hi = s.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in s.split(",")]


def main(argv=None) -> None:
    ap = cli.ArgumentParser(prog="synthetic.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modulus", type=int, default=5)
    ap.add_argument("--mid-k", default="1-6", help='k of the mid-training problems, e.g. "1-6" or "1,2"')
    ap.add_argument("--mid-weights", default="8,8,2,1,0.5,0.5", help="relative share of each mid k")
    ap.add_argument("--n-mid", type=int, default=15360, help="= 480 steps x 32 sequences, one epoch")
    ap.add_argument("--teacher-k", default="3")
    ap.add_argument("--n-teacher", type=int, default=512, help="teacher questions (x --samples rows)")
    ap.add_argument("--samples", type=int, default=16, help="teacher samples per question")
    ap.add_argument("--eval-id-k", default="3", help="in-distribution eval k (the teacher's)")
    ap.add_argument("--eval-ood-k", default="4", help="out-of-distribution (harder) eval k")
    ap.add_argument("--eval-mid-k", default="2", help="retention eval k (what mid-training taught)")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--teacher-error-scale", type=float, default=1.0,
                    help="the simulated teacher's per-step error probability x this: < 1 a more reliable teacher "
                         "(more all-positive groups), > 1 a less reliable one (README: the all-positive share sweep)")
    a = ap.parse_args(argv)

    def bad(message):
        cli.fail("synthetic.py", message)

    ks = {}
    for flag in ("--mid-k", "--teacher-k", "--eval-id-k", "--eval-ood-k", "--eval-mid-k"):
        value = getattr(a, flag[2:].replace("-", "_"))
        try:
            ks[flag] = _ks(value)
        except ValueError:
            ks[flag] = []
        if not ks[flag] or not all(1 <= k <= len(VAR_NAMES) for k in ks[flag]):
            bad(f"{flag} {value!r}: expected a range like 1-6 or a list like 1,2 of k in 1..{len(VAR_NAMES)}")
    try:
        weights = [float(w) for w in a.mid_weights.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(0 < w < float("inf") for w in weights):
        bad(f"--mid-weights {a.mid_weights!r}: expected positive numbers separated by commas, e.g. 8,8,2")
    if len(weights) != len(ks["--mid-k"]):
        bad(f"--mid-weights {a.mid_weights!r}: needs one weight per --mid-k value ({len(ks['--mid-k'])})")
    if not 0 <= a.teacher_error_scale < float("inf"):
        bad(f"--teacher-error-scale {a.teacher_error_scale:g}: must be >= 0")
    if a.modulus < 2:
        bad(f"--modulus {a.modulus}: must be >= 2")
    for flag in ("--n-mid", "--n-teacher", "--samples", "--n-eval"):
        if getattr(a, flag[2:].replace("-", "_")) < 1:
            bad(f"{flag} {getattr(a, flag[2:].replace('-', '_'))}: must be >= 1")
    why = cli.unwritable(a.out, directory=True)
    if why:
        bad(f"--out {a.out}: cannot be written: {why}")
    try:
        stats = write_data(Path(a.out), seed=a.seed, modulus=a.modulus, mid_k=ks["--mid-k"], mid_weights=weights,
                           n_mid=a.n_mid, teacher_k=ks["--teacher-k"], n_teacher=a.n_teacher, samples=a.samples,
                           eval_id_k=ks["--eval-id-k"], eval_ood_k=ks["--eval-ood-k"], n_eval=a.n_eval,
                           eval_mid_k=ks["--eval-mid-k"], teacher_error_scale=a.teacher_error_scale)
    except DrawError as e:
        bad(e)
    print(json.dumps({"out": a.out, **stats}))


if __name__ == "__main__":
    main()
