"""The launchers' stop-and-save budget: on SIGTERM torchrun passes the signal to its workers and SIGKILLs
those still alive --shutdown-timeout seconds later (torchrun's own default: 30 s). launch/local.sh and
launch/slurm.sbatch set it (SHUTDOWN_TIMEOUT_S, default 900) so train.py can finish a multi-minute 7B step and
write its checkpoint; Slurm's --signal lead time must exceed it.

Real processes: launch/local.sh -> torchrun (2 CPU ranks) -> a stand-in worker (TRAIN_SCRIPT) that, like
train.py, keeps working after SIGTERM and then exits 0. slurm.sbatch runs under a fake srun/scontrol that
record the torchrun command line, which torchrun's own parser then reads.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the torchrun of this Python, not a shim or another install
WORK_S = 4.0  # how long the stand-in keeps working after SIGTERM ("finish the step, save")

# Like train.py: SIGTERM only sets a flag; the work in progress goes on, then the "checkpoint", then exit 0.
WORKER = r'''
import json, os, signal, sys, time
rank, out = int(os.environ["RANK"]), os.environ["LAUNCH_TEST_DIR"]
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(time.monotonic()))
with open(f"{out}/ready-{rank}.tmp", "w") as f:
    json.dump({"world": int(os.environ["WORLD_SIZE"]), "argv": sys.argv[1:], "pid": os.getpid()}, f)
os.rename(f"{out}/ready-{rank}.tmp", f"{out}/ready-{rank}")
while not stop:
    time.sleep(0.02)
while time.monotonic() < stop[0] + float(os.environ["LAUNCH_TEST_WORK_S"]):
    time.sleep(0.05)  # "the rest of the step and the checkpoint"
with open(f"{out}/saved-{rank}", "w") as f:
    f.write("ok")
sys.exit(0)
'''


def env_with(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    return {**env, "PATH": BIN + os.pathsep + env.get("PATH", ""), "OMP_NUM_THREADS": "1", **extra}


def ready(out, proc, timeout=60):
    """{rank: ready record} once every rank of the world installed its SIGTERM handler."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "launcher ended before its workers were ready"
        found = {int(n.split("-")[1]): n for n in os.listdir(out) if re.fullmatch(r"ready-\d+", n)}
        if found:
            recs = {r: json.loads((out / n).read_text()) for r, n in found.items()}
            world = next(iter(recs.values()))["world"]
            if sorted(recs) == list(range(world)):
                return recs
        time.sleep(0.05)
    raise AssertionError(f"workers not ready within {timeout} s")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sigterm_local_launch(tmp_path, timeout_s):
    """bash launch/local.sh with the stand-in worker; SIGTERM to the launcher once every rank is ready.
    Returns (ready records, launcher exit code, seconds from SIGTERM to launcher exit, log, saved ranks)."""
    out = tmp_path / f"t{timeout_s}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log_path = out / "launcher.log"
    env = env_with(TRAIN_SCRIPT=str(script), SHUTDOWN_TIMEOUT_S=str(timeout_s), LAUNCH_TEST_DIR=str(out),
                   LAUNCH_TEST_WORK_S=str(WORK_S), MAX_RESTARTS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local.sh"), "cfg.yaml", "a.b=1"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    recs = {}
    try:
        recs = ready(out, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # local.sh execs torchrun: this is the launcher's pid
        rc = proc.wait(timeout=timeout_s + WORK_S + 30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        for rec in recs.values():
            if alive(rec["pid"]):
                os.kill(rec["pid"], signal.SIGKILL)
    saved = sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("saved-"))
    return recs, rc, seconds, log_path.read_text(errors="replace"), saved


def test_a_shutdown_timeout_longer_than_the_work_lets_every_rank_finish_and_save(tmp_path):
    timeout_s = int(WORK_S) + 10
    recs, rc, seconds, log, saved = sigterm_local_launch(tmp_path, timeout_s)
    assert sorted(recs) == list(range(recs[0]["world"])) and len(recs) >= 2
    assert all(r["argv"] == ["cfg.yaml", "train.resume=auto", "a.b=1"] for r in recs.values())  # local.sh's args
    assert saved == sorted(recs), log[-3000:]  # every rank wrote its "checkpoint": no SIGKILL
    assert "forcefully exiting" not in log, log[-3000:]
    assert WORK_S <= seconds < timeout_s, (seconds, log[-3000:])  # waited for the workers, not the deadline
    assert rc != 0  # torchrun itself ends on the signal (SignalException), after its workers exited 0


def test_a_shutdown_timeout_shorter_than_the_work_sigkills_the_workers(tmp_path):
    recs, rc, seconds, log, saved = sigterm_local_launch(tmp_path, 1)
    assert saved == [], log[-3000:]  # killed mid-"save"
    assert "forcefully exiting" in log, log[-3000:]  # torchrun's SIGKILL after --shutdown-timeout
    assert seconds < WORK_S, seconds
    assert not any(alive(r["pid"]) for r in recs.values())


# --------------------------------------------------------------------------- the numbers, as torchrun reads them

def recorded_torchrun(tmp_path, launcher, args, env):
    """Run a launcher with fake srun/scontrol/torchrun on PATH that record argv; return torchrun's argv."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    rec = tmp_path / "argv.jsonl"
    recorder = f'#!{sys.executable}\nimport json, os, sys\n' \
               f'open({str(rec)!r}, "a").write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")\n'
    for name in ("srun", "torchrun"):
        (fake / name).write_text(recorder)
        (fake / name).chmod(0o755)
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho node-a; echo node-b\n")
    (fake / "scontrol").chmod(0o755)
    if rec.exists():
        rec.unlink()
    env = {**env_with(**env), "PATH": f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", os.path.join(ROOT, "launch", launcher), *args], cwd=tmp_path, env=env, check=True,
                   timeout=60)
    argv = json.loads(rec.read_text().splitlines()[-1])
    if argv[0] == "srun":
        argv = argv[1:]
    assert argv[0] == "torchrun", argv
    return argv[1:]


def launch_config(argv, monkeypatch):
    """The LaunchConfig torchrun builds from this command line (torch.distributed.run's own parser)."""
    from torch.distributed import run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it in os.environ when unset
    for k in [k for k in os.environ if k.startswith("PET_")] + ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]:
        monkeypatch.delenv(k, raising=False)
    args = run.parse_args(argv)
    if args.standalone:  # what run.run does before config_from_args
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", "x"
    config, _, _ = run.config_from_args(args)
    return config


SLURM_ENV = {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42"}


def test_both_launchers_give_torchrun_the_same_timeout_and_slurm_signals_before_it(tmp_path, monkeypatch):
    local = launch_config(recorded_torchrun(tmp_path, "local.sh", ["cfg.yaml"], {}), monkeypatch)
    slurm = launch_config(recorded_torchrun(tmp_path, "slurm.sbatch", ["cfg.yaml"], SLURM_ENV), monkeypatch)
    assert local.shutdown_timeout == slurm.shutdown_timeout == 900  # torchrun's default would be 30
    assert local.max_restarts == slurm.max_restarts == 1
    assert (slurm.min_nodes, slurm.max_nodes, slurm.rdzv_endpoint, slurm.run_id) == (2, 2, "node-a:29500", "42")
    with open(os.path.join(ROOT, "launch", "slurm.sbatch")) as f:
        lead = [int(m[1]) for m in re.finditer(r"^#SBATCH --signal=TERM@(\d+)\b", f.read(), re.M)]
    assert len(lead) == 1 and lead[0] >= slurm.shutdown_timeout + 120, lead  # torchrun is done before the limit


@pytest.mark.parametrize("launcher,env", [("local.sh", {}), ("slurm.sbatch", SLURM_ENV)])
def test_shutdown_timeout_s_overrides_the_default(tmp_path, monkeypatch, launcher, env):
    argv = recorded_torchrun(tmp_path, launcher, ["cfg.yaml", "x.y=2"], {**env, "SHUTDOWN_TIMEOUT_S": "77"})
    assert launch_config(argv, monkeypatch).shutdown_timeout == 77
    assert argv[-3:] in (["cfg.yaml", "train.resume=auto", "x.y=2"], ["cfg.yaml", "x.y=2", "train.resume=auto"])
