# The tiny lab's steps, shared by launch/demo.sh and launch/sweep.sh (source it; it defines functions only).
# Layout under $runs (default runs/tiny); every step resumes where it stopped (train.resume=auto, resumable eval):
#   base/seed<S>/                 the mid-trained base of seed S (train.seed=S: its init and data order)
#   <run>/seed<S>/                a post-training run from base/seed<S> with train.seed=S
#   eval/<row>/<set>/seed<S>/     eval.math of a row's model on eval_id, eval_ood, eval_mid with sampling seed S
# Seed S thus varies the base, the post-training and the evaluation sampling together: a table over seeds carries
# the variance of all three (the base's is the largest measured so far, README "The tiny lab").
runs=${runs:-runs/tiny}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
lab_start=${lab_start:-$(date +%s)}
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node=2)
LAB_SETS=(eval_id eval_ood eval_mid)  # the teacher's k, harder (k + 1), retention (what mid-training taught)
stamp() { echo "[lab $(( $(date +%s) - lab_start ))s] $*"; }

lab_data() {  # the synthetic data, curated teacher groups and validation problems (deterministic: rewritten alike)
  python synthetic.py --out data/tiny
  python curate.py --input data/tiny/teacher_raw.jsonl --output data/tiny/teacher.jsonl
  python synthetic.py --out data/tiny/val --seed 1 --n-mid 64 --n-teacher 4 --n-eval 50  # validation problems only
}

lab_base() {  # seed: mid-train base/seed<S> (once; a finished base is left as it is)
  local seed=$1
  if [ ! -f "$runs/base/seed$seed/hf/final/config.json" ]; then
    stamp "base model (mid-training, seed $seed)"
    "${torchrun[@]}" train.py configs/tiny/base.yaml output_dir="$runs/base/seed$seed" train.seed="$seed"
  fi
}

lab_post() {  # run config seed [overrides...]: post-train <run>/seed<S> from base/seed<S>
  local run=$1 config=$2 seed=$3; shift 3
  stamp "post-training $run (seed $seed)"
  "${torchrun[@]}" train.py "$config" output_dir="$runs/$run/seed$seed" \
    model.path="$runs/base/seed$seed/hf/final" train.seed="$seed" "$@"
}

lab_eval() {  # eval_root seed row1 model1 row2 model2 ...: every set, all rows in one process per set
  local root=$1 seed=$2; shift 2
  local rows=() dirs=() pids=()
  while [ $# -gt 0 ]; do rows+=("$1"); dirs+=("$2"); shift 2; done
  stamp "eval ${rows[*]} (seed $seed)"
  mkdir -p "$root"
  for set in "${LAB_SETS[@]}"; do  # the sets side by side (n samples at the blog's T / top-p)
    local outs=()
    for row in "${rows[@]}"; do outs+=("$root/$row/$set/seed$seed"); done
    python -m eval.math --model "${dirs[@]}" --out "${outs[@]}" --data "data/tiny/$set.jsonl" --n 4 \
      --temperature 0.6 --top-p 0.95 --max-new-tokens 160 --batch-size 200 --no-instruction --seed "$seed" \
      > "$root/$set-seed$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # (set -e in the caller: a failed evaluation stops it)
}
