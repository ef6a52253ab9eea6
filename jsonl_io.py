"""Reading JSONL input that may be partly malformed: the rule curate.py (raw rows) and data.py (curated records)
share, in one place both import (so neither imports the other).

A malformed line (not UTF-8, not JSON, not a JSON object) is skipped and counted by reason, with the first
offending file:line named (MalformedCounter); if more than MAX_MALFORMED_FRACTION of the non-blank lines are
malformed, or nothing was read, the read aborts with DataError, which the command-line tools print as one line.
"""
import json
import os


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
