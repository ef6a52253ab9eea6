#!/usr/bin/env bash
# The tiny lab end to end on any CPU: synthetic data -> tiny base model (mid-training by SFT) -> each
# post-training variant from that same base (sft, offgrpo, bias05, krafton_code, onpolicy, dpo, rft; torchrun),
# each on a drawn question subset for 2 epochs with validation after each epoch (the blog's protocol) ->
# evaluation of each variant's best epoch (hf/best) on held-out in-distribution, harder and retention problems ->
# runs/tiny/results.{md,json,png} and runs/tiny/curves.png (every variant's training curves, eval.plot).
#   bash launch/demo.sh              # seed 0
#   bash launch/demo.sh --seeds 3    # seeds 0-2: each its own base, post-training and sampling (launch/lab.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=1
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) seeds=$2; shift 2 ;;
    *) echo "usage: bash launch/demo.sh [--seeds N]" >&2; exit 2 ;;
  esac
done
source launch/lab.sh  # re-running continues where it stopped; rm -rf runs/tiny for a fresh lab
VARIANTS=(sft offgrpo bias05 krafton_code onpolicy dpo rft)

stamp "data"
lab_data
for seed in $(seq 0 $((seeds - 1))); do
  lab_base "$seed"
  models=(base "$runs/base/seed$seed/hf/final")
  for variant in "${VARIANTS[@]}"; do
    lab_post "$variant" "configs/tiny/$variant.yaml" "$seed"
    models+=("$variant" "$runs/$variant/seed$seed/hf/best")  # the best epoch by validation
  done
  lab_eval "$runs/eval" "$seed" "${models[@]}"
done

# + results.png; every row against the base and the blog's comparisons, with 95% bootstrap intervals over problems
python -m eval.table "$runs/eval" --out "$runs/results.md" --json "$runs/results.json" --baseline base \
  --pairs bias05-offgrpo,offgrpo-sft,bias05-sft,dpo-offgrpo,rft-sft
python -m eval.plot $(for v in "${VARIANTS[@]}"; do echo "$runs/$v"/seed*; done) --out "$runs/curves.png"
stamp "done"
cat "$runs/results.md"
