#!/usr/bin/env bash
# First contact with a GPU: what the CPU suite cannot see, checked in minutes on one CUDA GPU (README: "First run on
# a GPU"). Five parts, each a fresh process (benchmarks/gpu_check/), each printing one line -- PASS / FAIL / SKIP
# <part>: <numbers> -- and writing <out>/<part>.json (its log: <out>/<part>.log); a failing part does not stop the
# others. Everything is made from configs and synthetic data; nothing is downloaded or installed.
#   bash launch/gpu_check.sh                  # all parts, within ~8 minutes
#   bash launch/gpu_check.sh --quick          # fewer shapes and steps, within ~3 minutes
#   bash launch/gpu_check.sh --tiny           # tiny shapes: every code path in ~2 minutes (a smoke run)
#   bash launch/gpu_check.sh --only train,vllm
#   bash launch/gpu_check.sh --device cpu --tiny   # no GPU: the CPU fallbacks (tests/test_gpu_check.py)
# Parts: kernels (Triton/torch log-probs vs fp32 at the 7B's shapes), speed (vs cuBLAS GEMM, peak memory, autotune
# picks, Liger / CCE), memory (benchmarks/memory.py vs the allocator), train (train.py on CUDA + NCCL vs CPU fp32,
# save + resume), vllm (engine vs HF, weight sync, sleep / wake up).
# Exit: 0 when every part passed or was skipped, 1 when any failed (or no GPU is here), 2 on bad arguments.
# GPU_CHECK_BUDGET_SCALE=F multiplies every part's time budget (a slow machine); PYTHON picks the interpreter.
set -uo pipefail
usage="usage: bash launch/gpu_check.sh [--quick] [--tiny] [--only PART[,PART...]] [--out DIR] [--device cuda|cpu]"
all_parts="kernels speed memory train vllm"
fail_args() { echo "gpu_check.sh: error: $* ($usage)" >&2; exit 2; }
quick=0 tiny=0 out=gpu_check device=cuda only=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; shift ;;
    --tiny) tiny=1; shift ;;
    --out|--device|--only)
      [ $# -ge 2 ] && [ -n "$2" ] || fail_args "$1 needs a value"
      case $1 in --out) out=$2 ;; --device) device=$2 ;; --only) only=$2 ;; esac
      shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) fail_args "unknown argument '$1'" ;;
  esac
done
case $device in cuda|cpu) ;; *) fail_args "--device $device: must be cuda or cpu" ;; esac
[ "$device" = cpu ] && [ $tiny = 0 ] && fail_args "--device cpu runs only with --tiny (real shapes take hours on a CPU)"
parts=$all_parts
if [ -n "$only" ]; then
  parts=${only//,/ }
  for p in $parts; do
    case " $all_parts " in *" $p "*) ;; *) fail_args "--only: unknown part '$p' (parts: ${all_parts// /, })" ;; esac
  done
fi
case $out in /*) ;; *) out=$PWD/$out ;; esac
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=false

# One line, at once, on a machine without a GPU (the import of torch is the only wait).
if [ "$device" = cuda ]; then
  if ! header=$("$py" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}: torch.cuda.is_available() is False")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>&1); then
    echo "gpu_check.sh: needs a CUDA GPU and found none (${header##*$'\n'}); nothing was run (on a CPU: --device cpu --tiny)" >&2
    exit 1
  fi
else
  header="CPU fallbacks (the Triton interpreter): code paths only, no GPU numbers"
fi
# `benchmarks` is a directory without __init__.py: an installed regular package of that name would win the import.
if ! where=$("$py" -c 'import benchmarks.gpu_check.common as c; print(c.__file__)' 2>&1) \
    || [ "$where" != "$PWD/benchmarks/gpu_check/common.py" ]; then
  echo "gpu_check.sh: 'import benchmarks.gpu_check' does not find this repository's (${where##*$'\n'})" >&2
  exit 1
fi
mkdir -p "$out" 2>/dev/null && [ -w "$out" ] || fail_args "--out $out: cannot be created or written"

# Time budget per part in seconds (a part over it is killed and FAILs): full | --quick | --tiny | --device cpu.
budget_of() {
  local full quick_s
  case $1 in
    kernels) full=90 quick_s=35 ;; speed) full=110 quick_s=30 ;; memory) full=80 quick_s=30 ;;
    train) full=120 quick_s=45 ;; vllm) full=80 quick_s=40 ;;
  esac
  local b=$full
  [ $quick = 1 ] && b=$quick_s
  [ $tiny = 1 ] && b=90
  [ "$device" = cpu ] && b=900
  awk -v b="$b" -v s="${GPU_CHECK_BUDGET_SCALE:-1}" 'BEGIN { v = int(b * s + 0.999); print (v < 1 ? 1 : v) }'
}
module_of() { case $1 in memory) echo memory_check ;; train) echo train_check ;; vllm) echo vllm_check ;; *) echo "$1" ;; esac; }

flags=(--out "$out" --device "$device")
[ $quick = 1 ] && flags+=(--quick)
[ $tiny = 1 ] && flags+=(--tiny)
mode=full
[ $quick = 1 ] && mode=quick
[ $tiny = 1 ] && mode=tiny
echo "gpu_check: $header; $mode; parts: $parts; results in $out"
start=$(date +%s) failed=0 passed=0 skipped=0
for part in $parts; do
  budget=$(budget_of "$part")
  rm -f "$out/$part.json"
  timeout -k 10 "$budget" "$py" -m "benchmarks.gpu_check.$(module_of "$part")" "${flags[@]}" \
    >"$out/$part.line" 2>"$out/$part.log"
  rc=$?
  line=$(tail -n 1 "$out/$part.line")
  rm -f "$out/$part.line"
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    line="FAIL $part: over its budget of ${budget} s, killed (the checks it finished: $out/$part.json; log: $out/$part.log)"
  elif [ -z "$line" ] || [ ! -f "$out/$part.json" ]; then
    line="FAIL $part: exit $rc without a summary (log: $out/$part.log)"
  elif [ $rc != 0 ] && [ "${line%% *}" != FAIL ]; then
    line="FAIL $part: exit $rc after: $line"
  fi
  if [ ! -f "$out/$part.json" ] || [ "${line%% *}" = FAIL ] && ! grep -q '"status": "fail"' "$out/$part.json" 2>/dev/null; then
    text=${line#*: } && text=${text//\\//} && text=${text//\"/\'}  # (JSON-safe: no backslash, no double quote)
    printf '{"part": "%s", "status": "fail", "summary": "%s", "exit": %s}\n' "$part" "$text" "$rc" \
      >"$out/$part.json"  # (the part left no JSON of its own, or one that disagrees with its exit)
  fi
  echo "$line"
  case ${line%% *} in PASS) passed=$((passed + 1)) ;; SKIP) skipped=$((skipped + 1)) ;; *) failed=$((failed + 1)) ;; esac
done
echo "gpu_check: $passed passed, $failed failed, $skipped skipped in $(( $(date +%s) - start )) s;" \
  "numbers in $out/<part>.json, logs in $out/<part>.log"
[ $failed = 0 ]
