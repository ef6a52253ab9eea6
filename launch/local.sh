#!/usr/bin/env bash
# One machine, all its GPUs (or 2 CPU ranks when there is no GPU):
#   bash launch/local.sh configs/bias05.yaml [section.key=value ...]
# Environment: MAX_RESTARTS (default 1); SHUTDOWN_TIMEOUT_S (default 900): seconds torchrun waits after
# forwarding SIGTERM before it SIGKILLs the workers; TRAIN_SCRIPT (default train.py): the worker script
# (tests/_fault_run.py, or a test's stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; shift
if command -v nvidia-smi >/dev/null 2>&1; then
  nproc=$(nvidia-smi -L | wc -l)
else
  nproc=2; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# --max-restarts: a dead rank restarts the job, which resumes from the newest complete checkpoint.
# A fresh rendezvous store per attempt: with the shared one, restarted workers can read the dead
# attempt's keys and hang (pytorch#135712); model_utils refuses restarts without it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# --shutdown-timeout: on SIGTERM torchrun passes the signal to the workers (train.py finishes its step,
# saves a checkpoint, exits 0) and SIGKILLs those still alive this many seconds later (torchrun's default:
# 30 s, too short for a 7B step + save). 900 s > ~6 min estimated worst case for bias05 on 8 GPUs; see
# the README ("Preemption and time limits") for the arithmetic.
shutdown_timeout=${SHUTDOWN_TIMEOUT_S:-900}
exec torchrun --standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-1}" \
  --shutdown-timeout="$shutdown_timeout" \
  "${TRAIN_SCRIPT:-train.py}" "$config" train.resume=auto "$@"
