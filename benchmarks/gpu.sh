#!/usr/bin/env bash
# The GPU checks and figures of docs/speed.md ("On a GPU"), in one run on a machine with a CUDA device:
#
#   bash benchmarks/gpu.sh OUT_DIR [DATA_ROOT]
#
# lenet runs from this checkout (PYTHONPATH=src) under the python3 that holds a CUDA build of torch;
# DATA_ROOT (default $LENET_DATA_ROOT) holds fashion-mnist/ and mnist/. Writes OUT_DIR/gpu.log (all
# output) and one JSON per benchmark. Each step has a time limit (seconds: TEST_LIMIT for the tests,
# default 300; STEP_LIMIT for each benchmark, default 120) so that one that hangs cannot take the
# rest with it; a failed step is reported, the next one runs, and the script exits 1 at the end.
# QUICK=1 DEVICE=cpu rehearses the benchmarks on a machine without a GPU (synthetic data, a few steps).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [DATA_ROOT]}
root=${2:-${LENET_DATA_ROOT:-}}
[ -d "$root" ] || { echo "gpu.sh: data root '$root' is not a folder: give DATA_ROOT or set LENET_DATA_ROOT" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LENET_DATA_ROOT=$(cd "$root" && pwd)
cd "$(dirname "$0")/.."  # the checkout's root
log="$out/gpu.log"
: >"$log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LENET_CACHE_DIR="${LENET_CACHE_DIR:-$(mktemp -d)}"  # decoded data and inductor's kernels, shared by the steps
export LENET_NO_FAST_CONV=1  # the CPU kernels are not used on a GPU: do not spend the time building them
device=${DEVICE:-cuda}
quick=$([ "${QUICK:-0}" = 1 ] && echo --quick)
failed=0

step() {  # step NAME LIMIT COMMAND...: run it under the time limit, its output into the log
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  echo ">> $name: $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo ">> $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" = 0 ] || failed=1
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, platform; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN',
torch.backends.cudnn.version(), 'python', platform.python_version(), 'CPU threads', torch.get_num_threads())"
} 2>&1 | tee -a "$log"

# 1. The CUDA paths, tested (tests/test_cuda.py: fp32, bf16, fp16, CUDA graphs, GPU -> CPU, the peak).
[ -z "$quick" ] && step tests "${TEST_LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider --durations=0 -m gpu tests/test_cuda.py

# 2. The two records, time to accuracy, 3 seeds each, eagerly (compiling would count in the time).
step record-mnist "${STEP_LIMIT:-120}" python3 -m lenet bench $quick --device "$device" --no-compile \
  --model record-mnist --dataset mnist --to-accuracy 0.99 --budget 10 --seeds 3 --json "$out/record-mnist.json"
step record-fashion "${STEP_LIMIT:-120}" python3 -m lenet bench $quick --device "$device" --no-compile \
  --model record-fashion --to-accuracy 0.92 --budget 60 --seeds 3 --json "$out/record-fashion.json"

# 3. The book's recipe (classic, 10 epochs): the textbook loop vs lenet's engine (compiled, as by default).
step bench-classic "${STEP_LIMIT:-120}" python3 -m lenet bench $quick --device "$device" --model classic \
  --epochs 10 --seeds 1 --json "$out/bench-classic.json"

# 4. Every preset's arithmetic rate against the GPU's TF32 peak, 2 epochs, eagerly, at SGD lr 0.05
#    (lr 0.9, the CPU table's, drives lenet5 and record-mnist far off; a NaN would stop the step).
step bench-family "${STEP_LIMIT:-120}" python3 -m lenet bench $quick --device "$device" --no-compile --arms engine \
  --epochs 2 --seeds 1 --lr 0.05 --model classic,modern,lenet5,record-mnist,record-fashion --json "$out/bench-family.json"

grep -E "^>> .*: exit" "$log"
exit "$failed"
