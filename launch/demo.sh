#!/usr/bin/env bash
# The tiny lab end to end on any CPU: synthetic data -> tiny base model (mid-training by SFT) -> each
# post-training variant from that same base (sft, offgrpo, bias05, krafton_code, onpolicy, dpo, rft; torchrun, 2 ranks),
# each on a drawn question subset for 2 epochs with validation after each epoch (the blog's protocol) ->
# evaluation of each variant's best epoch (hf/best) on held-out in-distribution and harder problems ->
# runs/tiny/results.{md,json,png} and runs/tiny/curves.png (every variant's training curves, eval.plot).
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
python curate.py --input data/tiny/teacher_raw.jsonl --output data/tiny/teacher.jsonl
python synthetic.py --out data/tiny/val --seed 1 --n-mid 64 --n-teacher 4 --n-eval 50  # validation problems only

stamp "base model (mid-training)"
"${torchrun[@]}" train.py configs/tiny/base.yaml output_dir=$runs/base

# Eval: n samples per problem at the blog's temperature/top-p, the base and the seed's variants in one
# process per set (one start-up); the two sets run side by side (one core each).
evaluate() {  # seed name1 dir1 name2 dir2 ...
  local seed=$1; shift
  local names=() dirs=() pids=()
  while [ $# -gt 0 ]; do names+=("$1"); dirs+=("$2"); shift 2; done
  for bench in eval_id eval_ood; do
    local outs=()
    for name in "${names[@]}"; do outs+=("$runs/eval/$name/$bench/seed$seed"); done
    python -m eval.math --model "${dirs[@]}" --out "${outs[@]}" --data data/tiny/$bench.jsonl --n 4 \
      --temperature 0.6 --top-p 0.95 --max-new-tokens 160 --batch-size 200 --no-instruction --seed "$seed" \
      > "$runs/eval-$bench-seed$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # (set -e: a failed evaluation stops the demo)
}
mkdir -p $runs/eval
for seed in $(seq 0 $((seeds - 1))); do
  models=(base $runs/base/hf/final)  # the base once per sampling seed: its spread is eval noise alone
  for variant in sft offgrpo bias05 krafton_code onpolicy dpo rft; do
    stamp "post-training $variant (seed $seed)"
    "${torchrun[@]}" train.py configs/tiny/$variant.yaml output_dir=$runs/$variant/seed$seed \
      model.path=$runs/base/hf/final train.seed=$seed
    models+=($variant $runs/$variant/seed$seed/hf/best)  # the best epoch by validation
  done
  stamp "eval base and variants (sampling seed $seed)"
  evaluate $seed "${models[@]}"
done

python -m eval.table $runs/eval --out $runs/results.md --json $runs/results.json  # + results.png (bar chart)
python -m eval.plot $runs/{sft,offgrpo,bias05,krafton_code,onpolicy,dpo,rft}/seed* --out $runs/curves.png
stamp "done"
cat $runs/results.md
