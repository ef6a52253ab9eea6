#!/usr/bin/env bash
# A grid of config overrides x seeds in the tiny lab, each run from its seed's base (shared with launch/demo.sh),
# its best epoch evaluated on the lab's three sets, one table over the grid:
#   bash launch/sweep.sh NAME CONFIG key=v1,v2,... [key2=w1,w2 ...] [--seeds N] [-- fixed overrides ...]
#   bash launch/sweep.sh bias configs/tiny/bias05.yaml loss.all_positive_bias=0,0.1,0.25,0.5,1.0 --seeds 3
# Several grid keys give their product. Runs: runs/tiny/sweeps/NAME/<k=v,...>/seed<S>; table:
# runs/tiny/sweeps/NAME/results.{md,json} (rows named by their overrides, the first grid point first).
# Resumable like the demo. A key the config does not have, a value it refuses, or a malformed grid: one line
# `sweep.sh: error: ...`, exit 2, before anything runs or is written.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash launch/sweep.sh NAME CONFIG key=v1,v2,... [key=...] [--seeds N] [-- fixed overrides ...]"
[ $# -ge 3 ] || { echo "sweep.sh: error: $usage" >&2; exit 2; }
name=$1 config=$2; shift 2
seeds=1 grid=() fixed=()
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) [ $# -ge 2 ] || { echo "sweep.sh: error: --seeds needs a number" >&2; exit 2; }; seeds=$2; shift 2 ;;
    --) shift; fixed=("$@"); break ;;
    *) grid+=("$1"); shift ;;
  esac
done
# the grid's points, each checked against the config (train.load_config: its keys and values) before anything runs
points=$(python launch/sweep_grid.py "$name" "$config" "$seeds" "${grid[@]}" -- "${fixed[@]}") || exit 2
source launch/lab.sh
root="$runs/sweeps/$name"

stamp "data"
lab_data
for seed in $(seq 0 $((seeds - 1))); do
  lab_base "$seed"
  models=()
  while IFS=$'\t' read -r row overrides; do
    read -ra ov <<< "$overrides"
    lab_post "sweeps/$name/$row" "$config" "$seed" "${ov[@]}" "${fixed[@]}"
    models+=("$row" "$runs/sweeps/$name/$row/seed$seed/hf/best")
  done <<< "$points"
  lab_eval "$root/eval" "$seed" "${models[@]}"
done
first=$(head -n1 <<< "$points" | cut -f1)  # every grid point against the first, with 95% bootstrap intervals
python -m eval.table "$root/eval" --out "$root/results.md" --json "$root/results.json" --baseline "$first"
stamp "done"
cat "$root/results.md"
