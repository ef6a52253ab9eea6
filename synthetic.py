"""The tiny lab's task: modular arithmetic over a random DAG, with traces, a simulated teacher,
a process reward and a character-level tokenizer.

Problem (difficulty k = number of operations). Variables v_1..v_k (distinct letters) with
    v_i = x_i op_i y_i  (mod m),  op_i in {+, -, *},
v_1 reads two constants; v_i (i > 1) reads v_{i-1} and either a constant or a random earlier
variable, so the target v_k depends on every node and exactly k steps are needed. The question
lists the k assignments in shuffled order:  "Mod 7: c=d*4, a=3+5, d=a-2. Find c."

Trace (the real teacher's layout, made compact because the tokenizer is character-level):
    <think>
    Define a=3+5=1.
    Define d=a-2=1-2=6.          (operand values substituted, then the result)
    Define c=d*4=6*4=3.
    </think>
    \\boxed{3}

Simulated teacher (16 samples per question). Per question, draw u ~ U(0, 1) and a fixed wrong
value w_j != true_j for every step j (a systematic misconception). The question's per-step error
probability is q = min(1, 4 u^3 p_step_error(k)) (mean p_step_error(k)); each sample is either
"systematic" (prob 1/2: its wrong steps write w_j) or "random" (wrong steps write a uniformly random
wrong value). Later steps compute from the written (wrong) values, so errors propagate. The spread
of q gives many all-positive groups (easy questions) and some questions where the shared wrong
value beats the truth, so majority voting is sometimes wrong (the blog's Figure 2 situation).

Process reward: every "Define v=...=value." step is re-checked against the true DAG value of v.
    fraction = #{nodes with a correct step (first occurrence)} / max(k, #steps parsed)
    strict   = fraction == 1   (all k nodes defined once, every one correct)

CALIBRATED DEFAULTS (see the CLI and the calibration notes at the bottom of this docstring):
filled in after measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

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
                "target": self.target, "order": list(self.order)}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(k=d["k"], modulus=d["modulus"], steps=[tuple(s) for s in d["steps"]],
                   target=d["target"], order=list(d["order"]))


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


def make_problem(rng: random.Random, k: int, modulus: int) -> Problem:
    assert k >= 1 and k <= len(VAR_NAMES)
    names = rng.sample(VAR_NAMES, k)
    steps = []
    for i, var in enumerate(names):
        op = rng.choice(OPS)
        if i == 0:
            a, b = rng.randrange(modulus), rng.randrange(modulus)
        else:
            # the chain edge v_{i-1} keeps every node an ancestor of the target
            other = names[rng.randrange(i - 1)] if i >= 2 and rng.random() < 0.5 else rng.randrange(modulus)
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

def build_tokenizer(out_dir):
    """Character-level HF tokenizer (tokenizers WordLevel over single characters) with ChatML
    special tokens and a chat template; AutoTokenizer.from_pretrained(out_dir) loads it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters, no spaces between tokens
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


def _unique_problems(rng, ks, n, modulus, seen: set) -> list[Problem]:
    """n problems with k drawn uniformly from ks, questions not in `seen` (which is updated)."""
    out = []
    while len(out) < n:
        p = make_problem(rng, rng.choice(ks), modulus)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def write_data(out: Path, *, seed: int, modulus: int, mid_k, n_mid: int, teacher_k, n_teacher: int,
               samples: int, eval_id_k, eval_ood_k, n_eval: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer")
    rng = random.Random(seed)
    seen: set = set()
    # eval sets first so training data never repeats an eval question
    evals = {name: _unique_problems(rng, ks, n_eval, modulus, seen)
             for name, ks in (("eval_id", eval_id_k), ("eval_ood", eval_ood_k))}
    for name, probs in evals.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for i, p in enumerate(probs):
                f.write(json.dumps({"id": f"{name}-{i}", "problem": p.question, "answer": str(p.answer),
                                    "dag": p.to_dict(), "k": p.k}) + "\n")
    with open(out / "mid.jsonl", "w") as f:
        for i, p in enumerate(_unique_problems(rng, mid_k, n_mid, modulus, seen)):
            f.write(json.dumps({"id": f"mid-{i}", "question": p.question, "responses": [correct_trace(p)],
                                "rewards": [1.0], "gold": str(p.answer), "agreement": 1.0,
                                "all_positive": True, "difficulty": p.k, "source": SOURCE,
                                "dag": p.to_dict()}) + "\n")
    stats = {"questions": 0, "all_positive": 0, "majority_correct": 0, "sample_correct": 0}
    with open(out / "teacher_raw.jsonl", "w") as f:
        for p in _unique_problems(rng, teacher_k, n_teacher, modulus, seen):
            traces = teacher_traces(p, rng, samples, p_step_error(p.k))
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modulus", type=int, default=7)
    ap.add_argument("--mid-k", default="1-2", help='k of the mid-training problems, e.g. "1-2" or "1,2"')
    ap.add_argument("--n-mid", type=int, default=20000)
    ap.add_argument("--teacher-k", default="3-4")
    ap.add_argument("--n-teacher", type=int, default=512, help="teacher questions (x --samples rows)")
    ap.add_argument("--samples", type=int, default=16, help="teacher samples per question")
    ap.add_argument("--eval-id-k", default="3-4", help="in-distribution eval k (the teacher's)")
    ap.add_argument("--eval-ood-k", default="5-6", help="out-of-distribution (harder) eval k")
    ap.add_argument("--n-eval", type=int, default=200)
    a = ap.parse_args(argv)
    stats = write_data(Path(a.out), seed=a.seed, modulus=a.modulus, mid_k=_ks(a.mid_k), n_mid=a.n_mid,
                       teacher_k=_ks(a.teacher_k), n_teacher=a.n_teacher, samples=a.samples,
                       eval_id_k=_ks(a.eval_id_k), eval_ood_k=_ks(a.eval_ood_k), n_eval=a.n_eval)
    print(json.dumps({"out": a.out, **stats}))


if __name__ == "__main__":
    main()
