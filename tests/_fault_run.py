"""train.py with one injected crash per torchrun attempt (used by tests/test_faults.py; no hooks in train.py).

    OFFGRPO_FAULTS='[{"kind": "torn_rank_file", "step": 3, "rank": 1}, ...]' OFFGRPO_PROBE=probe.jsonl \
    torchrun --max-restarts=N tests/_fault_run.py CONFIG.yaml [section.key=value ...]

Attempt a (TORCHELASTIC_RESTART_COUNT) injects fault a of the list, if any, by patching a writer that
checkpoint.save_state calls, then runs train.main unchanged:
  torn_rank_file      the rank writes the first half of its rank<R>.safetensors into ckpt/step-<step>.tmp
                      (after dcp.save wrote the shards), then SIGKILLs itself: a half-written checkpoint
                      without the COMPLETE marker, and a peer left waiting in the next barrier;
  kill_before_commit  the rank (0: it commits) SIGKILLs itself after COMPLETE is in ckpt/step-<step>.tmp,
                      just before the rename that commits it;
  kill_in_prepass     the rank SIGKILLs itself as it starts writing its <step>-th reference pre-pass shard
                      (ref_logprobs/rank<R>/shard-*.tmp): <step> - 1 shards committed, a peer left waiting;
  sigterm_in_prepass  the rank sends SIGTERM to its torchrun launcher (which passes it to every worker) once
                      its <step>-th pre-pass shard is committed; its micro-batches take 0.2 s each from the start,
                      so the pre-pass is still running when the signal arrives;
  slow_validation     the rank sleeps <step> seconds after its validation samples are decoded (a slow rank).
Before train.main, rank 0 of every attempt appends what a fresh process finds to OFFGRPO_PROBE:
{"attempt", "latest": checkpoint.latest_state(ckpt), "dirs": {name: has COMPLETE} for each dir in ckpt/}.
"""
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import safetensors.torch  # noqa: E402

import checkpoint  # noqa: E402
import train  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(kind: str, step: int, rank: int) -> None:
    tmp_dir = f"step-{step}.tmp"
    if int(os.environ["RANK"]) != rank:
        return
    if kind == "torn_rank_file":
        real = safetensors.torch.save_file

        def torn_save_file(tensors, filename, metadata=None):
            if not filename.endswith(os.path.join("ckpt", tmp_dir, f"rank{rank}.safetensors")):
                return real(tensors, filename, metadata=metadata)
            blob = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(blob[: len(blob) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        safetensors.torch.save_file = torn_save_file  # model_utils calls safetensors.torch.save_file
    elif kind == "kill_before_commit":
        real_rename = os.rename

        def rename_or_die(src, dst):
            if os.path.basename(src) == tmp_dir:
                assert os.path.isfile(os.path.join(src, checkpoint.COMPLETE_MARKER))
                die()
            return real_rename(src, dst)
        os.rename = rename_or_die
    elif kind in ("kill_in_prepass", "sigterm_in_prepass"):
        import reference
        import time
        real, written = safetensors.torch.save_file, []

        def save_shard(tensors, filename, metadata=None):
            shard = os.path.join("ref_logprobs", f"rank{rank}", "shard-") in filename
            if shard:
                written.append(filename)
            if shard and kind == "kill_in_prepass" and len(written) == step:
                die()
            real(tensors, filename, metadata=metadata)
            if shard and kind == "sigterm_in_prepass" and len(written) == step:
                os.kill(os.getppid(), signal.SIGTERM)
        safetensors.torch.save_file = save_shard  # reference.py calls safetensors.torch.save_file
        if kind == "sigterm_in_prepass":
            rows_batch = reference._rows_batch

            def slow_rows_batch(*args, **kwargs):
                time.sleep(0.2)
                return rows_batch(*args, **kwargs)
            reference._rows_batch = slow_rows_batch
    elif kind == "slow_validation":
        import sampling
        import time
        generate = sampling.policy_generate

        def slow_generate(*args, **kwargs):
            out = generate(*args, **kwargs)
            time.sleep(step)
            return out
        sampling.policy_generate = slow_generate
    else:
        raise ValueError(f"unknown fault {kind!r}")


def probe(attempt: int, ckpt: str, path: str) -> None:
    names = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
    found = {"attempt": attempt, "latest": checkpoint.latest_state(ckpt),
             "dirs": {n: os.path.isfile(os.path.join(ckpt, n, checkpoint.COMPLETE_MARKER)) for n in names}}
    with open(path, "a") as f:
        f.write(json.dumps(found) + "\n")


if __name__ == "__main__":
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    faults = json.loads(os.environ["OFFGRPO_FAULTS"])
    cfg = train.load_config(sys.argv[1], sys.argv[2:])
    if int(os.environ["RANK"]) == 0:
        probe(attempt, os.path.join(cfg.output_dir, "ckpt"), os.environ["OFFGRPO_PROBE"])
    if attempt < len(faults):
        inject(**faults[attempt])
    train.main(sys.argv[1:])
