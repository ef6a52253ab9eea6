"""Rewards for math answers: extraction, equivalence, majority vote.

    extract_answer(text)        the content of the last \\boxed{...} / \\fbox{...} (brace counting)
    answers_equivalent(a, b)    math-verify equivalence, made symmetric:
                                    verify(gold=a, target=b) or verify(gold=b, target=a)
    majority_vote(answers)      greedy equivalence clusters; gold = representative of the unique
                                largest cluster, reward r_i = 1[answer_i in that cluster]
    score(response, gold)       r = 1[extract_answer(response) equivalent to gold]
    joined_answer(text, parts)  several boxes of one final answer joined ", " (a gold listing values)
    grade_answer(final, gold)   eval's (answer, correct): the last box, or the boxes joined as gold lists them
    vote_answer(response)       curation's answer: the boxes after the last </think> joined, else the last box
    final_text(text, ...)       the part of a response its answer is read from (eval's grading):
                                after-think (default): the text after the last </think>; None (no answer)
                                when a <think> is never closed or the sample was cut off before its
                                end-of-turn; the whole text when there is no thinking block. whole: the text.

Curation (curate.py) labels teacher samples with majority_vote over vote_answer; eval/ grades samples with
grade_answer on final_text; the training rewards (rollouts) use score.

Timeouts. math-verify bounds its sympy work with signal.alarm, which only works in the main
thread. We keep that bound (TIMEOUT_SECONDS) in the main thread -- a comparison such as
9^{9^{9}} vs 2 otherwise runs for minutes -- and disable it elsewhere so that the functions can
be called from worker threads (there a pathological answer can be slow; the caller bounds it).
A comparison that times out counts as "not equivalent".

Budget. Answers that would cost the symbolic path seconds per comparison (longer than MAX_SYMBOLIC_CHARS,
nested deeper than MAX_SYMBOLIC_DEPTH, towers of exponents such as 9^{9^{9}}, huge factorials) are compared
as strings only (symbolic_ok; STATS["string_only"] counts them): the verdict does not depend on machine load.
A majority vote has a time budget (VOTE_BUDGET_SECONDS): past it, its remaining comparisons are string
comparisons (STATS["over_budget"]).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections import Counter

from math_verify import parse, verify

TIMEOUT_SECONDS = 5  # per parse / per comparison, main thread only (see module docstring)
MAX_SYMBOLIC_CHARS = 400  # longer answers are compared as strings only (the longest benchmark gold: 210)
MAX_SYMBOLIC_DEPTH = 12  # brace / parenthesis nesting beyond which an answer is compared as a string only
VOTE_BUDGET_SECONDS = 30.0  # majority_vote: past it, the remaining comparisons are string comparisons
STATS: Counter = Counter()  # string_only (degenerate answer), over_budget (a vote's budget spent): counts
# towers of numeric exponents (9^{9^{9}}, 2^2^2, 9^{(9^9)}), exponents of 6+ digits, factorials of 4+ digits
_DEGENERATE_RE = re.compile(r"\d\s*\^\s*[{(\s]*\d+\s*\^|\^\s*[{(\s]*\d{6,}|\d{4,}\s*!")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _timeout() -> int | None:
    """math-verify's timeout for the calling thread: signals are only usable in the main thread."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


# ------------------------------------------------------------------------------------------------
# extraction


def _braced_content(text: str, open_pos: int) -> str | None:
    """Content between text[open_pos] == '{' and its matching '}', or None if never closed.

    Escaped braces (\\{ and \\}) do not count, so \\boxed{\\{1,2\\}} gives \\{1,2\\}.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def extract_answer(text: str | None) -> str | None:
    """The stripped content of the LAST \\boxed{...} or \\fbox{...} in text.

    Nested braces are matched by counting (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}). The brace-less
    form `\\boxed 5` gives the following run of non-space characters (trailing . , ; dropped).
    Returns None when there is no box, when the last box is never closed (a truncated response),
    or when it is empty.
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _braced_content(text, end + (len(rest) - len(stripped)))
    elif rest[:1].isspace():
        # `\boxed 5`: LaTeX takes one token, but models mean the whole number that follows.
        m = re.match(r"[^\s${}]+", stripped)
        content = m.group(0).rstrip(".,;") if m else None
    else:
        content = None  # `\boxed` at the very end, or `\boxed$`
    if content is None:
        return None
    content = content.strip()
    return content or None


ANSWER_FROM = ("after-think", "whole")  # final_text's modes; eval.math --answer-from


def final_text(text: str, *, truncated: bool, answer_from: str = "after-think", think_open: bool = False) -> str | None:
    """The part of a sampled response that holds its answer, or None when it has none.

    answer_from="after-think" (a reasoning model's answer is what follows its thinking):
        cut off before the end-of-turn (truncated)            -> None
        a <think> after the last </think>, or think_open (the
        prompt opened <think>) with no </think> in the text    -> None (the thinking never ended)
        otherwise, with a </think>                            -> the text after the last </think>
        no thinking block at all                              -> the whole text
    answer_from="whole": the whole text, truncated or not (the training rewards' reading, reward.score).
    """
    if answer_from == "whole":
        return text
    if answer_from != "after-think":
        raise ValueError(f"answer_from {answer_from!r}: one of {', '.join(ANSWER_FROM)}")
    if truncated:
        return None
    opened, closed = text.rfind("<think>"), text.rfind("</think>")
    if opened > closed or (think_open and closed < 0):
        return None
    return text[closed + len("</think>"):] if closed >= 0 else text


def extract_boxes(text: str | None) -> list[str]:
    """The stripped, non-empty contents of every closed \\boxed{...} / \\fbox{...} of text, in order (the
    brace-less `\\boxed 5` form included, as in extract_answer)."""
    out = []
    for m in _BOX_RE.finditer(text or ""):
        got = extract_answer(text[m.start():m.end()] + text[m.end():m.end() + _next_box(text, m.end())])
        if got is not None:
            out.append(got)
    return out


def _next_box(text: str, start: int) -> int:
    """Characters from start to the next box command (or the end): a box's content never spans another box."""
    m = _BOX_RE.search(text, start)
    return (m.start() if m else len(text)) - start


def list_parts(answer: str) -> int:
    """How many values an answer lists: 1 + its commas outside (), [], {}, \\{ \\} ("1,-2" -> 2, "$69$,$84$"
    -> 2, "(1,2)" -> 1, "(1,2), (3,4)" -> 2, "[0, 1)" -> 1)."""
    depth, parts, i = 0, 1, 0
    while i < len(answer):
        ch = answer[i]
        if ch == "\\" and answer[i + 1:i + 2] in ("{", "}"):
            ch, i = answer[i + 1], i + 1
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts += 1
        i += 1
    return parts


def joined_answer(text: str | None, parts: int | None = None) -> str | None:
    """The answer of a final answer text whose values may sit in several boxes ("x = \\boxed{1} and x =
    \\boxed{-2}"): with fewer than 2 boxes, or parts == 1, extract_answer(text) (the last box); else its last
    `parts` boxes (grading: as many as the gold lists) or, parts None (a vote without gold), its distinct boxes
    in order, joined with ", " the way a gold lists values."""
    boxes = extract_boxes(text)
    if len(boxes) < 2 or parts == 1:
        return extract_answer(text)
    chosen = list(dict.fromkeys(boxes)) if parts is None else boxes[-parts:]
    return ", ".join(chosen) if len(chosen) > 1 else chosen[0]


def vote_answer(response: str) -> str | None:
    """A teacher response's answer for curation's majority vote: joined_answer of the text after its last
    </think> when that part has a box, else the last box of the whole response (extract_answer, as before)."""
    closed = response.rfind("</think>")
    final = response[closed + len("</think>"):] if closed >= 0 else response
    return joined_answer(final) if extract_boxes(final) else extract_answer(response)


def grade_answer(final: str | None, gold: str) -> tuple[str | None, bool]:
    """(answer, correct) of a final answer text against gold: the last box, or -- when gold lists several values
    and the text has several boxes -- the last list_parts(gold) boxes joined (joined_answer), whichever verifies."""
    last = extract_answer(final)
    if answers_equivalent(last, gold):
        return last, True
    joined = joined_answer(final, list_parts(gold))
    return joined, joined != last and answers_equivalent(joined, gold)


# ------------------------------------------------------------------------------------------------
# equivalence


def _normalise(s: str) -> str:
    return " ".join(s.split())


@functools.lru_cache(maxsize=1 << 16)
def _parse(answer: str) -> tuple:
    """math-verify parse of a bare answer, wrapped in $...$ so that it is read as LaTeX.

    ($...$ rather than \\boxed{...}: both parse the same on the cases we tried, except that
    `3.` only parses inside $...$ and an unbalanced `\\frac{` gets mangled inside a box.)
    Returns a tuple (hashable, immutable) of parsed objects; () when nothing parses.
    """
    try:
        return tuple(parse("$" + answer + "$", parsing_timeout=_timeout()))
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return ()


@functools.lru_cache(maxsize=1 << 16)
def _verify(gold: str, target: str) -> bool:
    pg, pt = _parse(gold), _parse(target)
    if not pg or not pt:
        return False
    try:
        return bool(verify(list(pg), list(pt), timeout_seconds=_timeout()))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """True when a and b denote the same mathematical answer (never raises).

    Equal strings after collapsing whitespace are equivalent without parsing. Otherwise both are
    parsed with math-verify and compared in both directions (math-verify's verify is asymmetric for
    equations and intervals, e.g. x<2 vs (-\\infty, 2)). Missing/empty answers, parse failures and
    timeouts give False.
    """
    if a is None or b is None:
        return False
    na, nb = _normalise(a), _normalise(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if not (symbolic_ok(na) and symbolic_ok(nb)):
        STATS["string_only"] += 1
        return False
    return _verify(na, nb) or _verify(nb, na)


def symbolic_ok(answer: str) -> bool:
    """False for an answer math-verify's symbolic path is not given (it would cost up to TIMEOUT_SECONDS per
    comparison, and a bound by wall clock makes the verdict depend on machine load): longer than
    MAX_SYMBOLIC_CHARS, nested deeper than MAX_SYMBOLIC_DEPTH, a tower of exponents, a huge factorial."""
    if len(answer) > MAX_SYMBOLIC_CHARS or _DEGENERATE_RE.search(answer):
        return False
    depth = deepest = 0
    for ch in answer:
        depth += ch in "{(["
        depth -= ch in "})]"
        deepest = max(deepest, depth)
    return deepest <= MAX_SYMBOLIC_DEPTH


# ------------------------------------------------------------------------------------------------
# majority vote and scoring


def majority_vote(answers: list[str | None], budget_seconds: float | None = VOTE_BUDGET_SECONDS,
                  ) -> tuple[str | None, list[float]]:
    """Majority answer of a group and the 0/1 rewards it implies.

    Time budget: once budget_seconds (None: no budget) have passed, the remaining comparisons of the vote
    are string comparisons (after collapsing whitespace), each counted in STATS["over_budget"].

    Greedy clustering: each non-None answer joins the first existing cluster whose representative
    (its first member) is equivalent to it, else it opens a new cluster. None answers join no
    cluster. gold = representative of the largest cluster, and r_i = 1.0 for its members, 0.0 for
    everyone else. If no answer is present, or two clusters tie for the largest, gold is None and
    every reward is 0.0.
    """
    clusters: list[list[int]] = []  # indices into answers; clusters[c][0] is the representative
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        for members in clusters:
            if _same(answers[members[0]], ans, deadline):
                members.append(i)
                break
        else:
            clusters.append([i])
    rewards = [0.0] * len(answers)
    if not clusters:
        return None, rewards
    sizes = sorted((len(c) for c in clusters), reverse=True)
    if len(sizes) > 1 and sizes[0] == sizes[1]:
        return None, rewards
    best = max(clusters, key=len)
    for i in best:
        rewards[i] = 1.0
    return answers[best[0]], rewards


def _same(a: str, b: str, deadline: float | None) -> bool:
    """answers_equivalent, or a string comparison once the vote's deadline has passed (counted)."""
    if deadline is not None and time.monotonic() > deadline:
        STATS["over_budget"] += 1
        return _normalise(a) == _normalise(b)
    return answers_equivalent(a, b)


def score(response_text: str, gold: str | None) -> float:
    """1.0 if the last boxed answer of response_text is equivalent to gold, else 0.0."""
    if gold is None:
        return 0.0
    return 1.0 if answers_equivalent(extract_answer(response_text), gold) else 0.0
