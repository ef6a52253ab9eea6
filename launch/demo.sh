#!/usr/bin/env bash
# The tiny lab end to end on any CPU: synthetic data -> tiny base model (mid-training by SFT) -> each
# post-training variant from that same base (sft, offgrpo, bias05, onpolicy; torchrun, 2 ranks) ->
# evaluation on held-out in-distribution and harder problems -> runs/tiny/results.{md,json}.
#   bash launch/demo.sh              # one post-training seed
#   bash launch/demo.sh --seeds 3    # three seeds per variant: the table gives mean ± spread
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=1
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) seeds=$2; shift 2 ;;
    *) echo "usage: bash launch/demo.sh [--seeds N]" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
runs=runs/tiny  # re-running continues where it stopped (train.resume=auto, resumable eval); rm -rf runs/tiny for a fresh lab
start=$(date +%s)
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node=2)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "data"
python synthetic.py --out data/tiny
python data.py curate --input data/tiny/teacher_raw.jsonl --output data/tiny/teacher.jsonl

stamp "base model (mid-training)"
"${torchrun[@]}" train.py configs/tiny/base.yaml output_dir=$runs/base

# Eval: n samples per problem at the blog's temperature/top-p; the two sets run side by side (one core each).
evaluate() {  # model_dir name seed
  for bench in eval_id eval_ood; do
    python -m eval.math --model "$1" --data data/tiny/$bench.jsonl --n 4 --temperature 0.6 --top-p 0.95 \
      --max-new-tokens 160 --batch-size 200 --no-instruction --seed "$3" --out "$runs/eval/$2/$bench/seed$3" \
      > "$runs/eval-$2-$bench-$3.log" 2>&1 &
  done
  wait
}
mkdir -p $runs/eval
for seed in $(seq 0 $((seeds - 1))); do
  stamp "eval base (sampling seed $seed)"  # the base's own spread: eval sampling noise alone
  evaluate $runs/base/hf/final base $seed
  for variant in sft offgrpo bias05 onpolicy; do
    stamp "post-training $variant (seed $seed)"
    "${torchrun[@]}" train.py configs/tiny/$variant.yaml output_dir=$runs/$variant/seed$seed \
      model.path=$runs/base/hf/final train.seed=$seed
    stamp "eval $variant (seed $seed)"
    evaluate $runs/$variant/seed$seed/hf/final $variant $seed
  done
done

python -m eval.table $runs/eval --out $runs/results.md --json $runs/results.json
stamp "done"
cat $runs/results.md
