"""tests/test_curate.py's dying worker: curate._vote, except that a question whose answers hold "KILL" kills
its own process with SIGKILL (what the out-of-memory killer does)."""
import os
import signal

import curate

_real_vote = curate._vote


def vote(job):
    if "KILL" in job[0]:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_vote(job)


if __name__ == "__main__":
    import sys
    curate._vote = vote  # the forked workers inherit it
    curate.main(sys.argv[1:])
