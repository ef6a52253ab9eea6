#!/usr/bin/env bash
# One machine, all its GPUs (or 2 CPU ranks when there is no GPU):
#   bash launch/local.sh configs/bias05.yaml [section.key=value ...]
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
exec torchrun --standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-1}" \
  train.py "$config" train.resume=auto "$@"
