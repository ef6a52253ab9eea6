#!/usr/bin/env bash
# Out-of-domain checks of an exported checkpoint with EleutherAI's lm-evaluation-harness:
# IFEval (instruction following) and GPQA-Diamond (graduate-level science, zero-shot CoT), the
# blog's "does math post-training hurt other skills" columns. Not part of the tests; needs a GPU
# node with network access (datasets come from the HF Hub; GPQA is gated: accept its terms and
# export HF_TOKEN first).
#
#   pip install "lm_eval[hf]"          # or "lm_eval[vllm]" for --backend vllm (much faster)
#   bash eval/harness.sh MODEL_DIR OUT_DIR [hf|vllm] [NUM_GPUS]
#
# MODEL_DIR is an HF-format directory written by train.py (<output_dir>/hf/final) or a Hub id.
# The reasoning model's chat template is applied (--apply_chat_template); think_end_token strips the
# <think>...</think> block before answer extraction; max_gen_toks leaves room for long traces.
# Results: OUT_DIR/<model>/results_*.json (plus per-sample logs from --log_samples).
set -euo pipefail

MODEL_DIR=${1:?usage: harness.sh MODEL_DIR OUT_DIR [hf|vllm] [NUM_GPUS]}
OUT_DIR=${2:?usage: harness.sh MODEL_DIR OUT_DIR [hf|vllm] [NUM_GPUS]}
BACKEND=${3:-vllm}
NUM_GPUS=${4:-1}
TASKS=ifeval,gpqa_diamond_cot_zeroshot
GEN_KWARGS="temperature=0.6,top_p=0.95,do_sample=True,max_gen_toks=32768"

case "$BACKEND" in
  vllm)
    MODEL_ARGS="pretrained=$MODEL_DIR,dtype=bfloat16,tensor_parallel_size=$NUM_GPUS,gpu_memory_utilization=0.85,max_model_len=34816,think_end_token=</think>"
    ;;
  hf)
    MODEL_ARGS="pretrained=$MODEL_DIR,dtype=bfloat16,parallelize=$([ "$NUM_GPUS" -gt 1 ] && echo True || echo False),think_end_token=</think>"
    ;;
  *)
    echo "harness.sh: backend must be hf or vllm, got '$BACKEND'" >&2
    exit 2
    ;;
esac

lm_eval \
  --model "$BACKEND" \
  --model_args "$MODEL_ARGS" \
  --tasks "$TASKS" \
  --apply_chat_template \
  --gen_kwargs "$GEN_KWARGS" \
  --batch_size auto \
  --seed 0 \
  --log_samples \
  --output_path "$OUT_DIR"
