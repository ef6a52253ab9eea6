"""The command-line error convention of every entry point (eval.math, eval.table, curate.py,
synthetic.py, benchmarks/*.py, launch/prepare_*.py; train.py has its own "config error:" / "data error:" lines):

    bad input -> exactly one line on stderr, `<command>: error: <what is wrong, and what is valid>`, exit status 2,
    no traceback, nothing written to the output place (the checks run before the work starts).

Unexpected exceptions (bugs) keep their traceback: callers catch only their specific bad-input cases.
This module imports nothing from the project (every entry point can import it without import cycles).
"""
import argparse
import os
import sys
import tempfile


def fail(command: str, message) -> None:
    """Print `<command>: error: <message>` as one line on stderr and exit with status 2."""
    text = " ".join(str(message).split("\n"))  # one line, whatever the message holds
    print(f"{command}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (missing or unknown arguments, a value of the wrong type) follow the
    convention: one line `<command>: error: <message>` (no usage block; -h prints it), exit status 2.
    command: the name in the message (default: prog)."""

    def __init__(self, *args, command: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command or self.prog

    def error(self, message):
        fail(self.command, f"{message} (-h for usage)")


def unwritable(path, *, directory: bool = False, parents: bool = False) -> str | None:
    """Why `path` cannot be written, or None. directory=False: a file opened for writing (its directory must
    exist, or with parents=True is made with its missing parents); directory=True: a directory made with its
    missing parents (os.makedirs) or written into.

    Permission bits do not tell everything (root passes os.access on /proc, a read-only mount, a full disk), so
    the last check is a probe: the directory chain is made and a file created in it, then both are removed;
    nothing is left behind whatever the answer."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if directory and not os.path.isdir(p):
            return f"{path} exists and is not a directory"
        if not directory and os.path.isdir(p):
            return f"{path} is a directory"
        if not os.access(p, os.W_OK | (os.X_OK if directory else 0)):
            return f"{path} is not writable"
        return _probe(p if directory else os.path.dirname(p), p if not directory else None)
    parent = os.path.dirname(p)
    while not os.path.exists(parent):  # the nearest existing ancestor
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not directory and not parents and parent != os.path.dirname(p):  # its directory is not made for it
        return f"directory {os.path.dirname(p)} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return _probe(p if directory else os.path.dirname(p), None)


def _probe(directory: str, existing_file: str | None) -> str | None:
    """Make `directory` (with its missing parents) and create a file in it, or open `existing_file` for appending
    (nothing is written to it); undo what was made. The OSError's reason, or None."""
    made = []
    d = directory
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        for m in reversed(made):
            os.mkdir(m)
        if existing_file is not None:
            open(existing_file, "ab").close()
        else:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-")
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        where = e.filename if e.filename in (*made, existing_file) else directory  # not the probe's own name
        return f"{where}: {e.strerror or e}"
    finally:
        for m in made:  # deepest first
            try:
                os.rmdir(m)
            except OSError:
                pass
    return None
