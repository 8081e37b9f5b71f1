#!/usr/bin/env bash
# The GPU check: kdjax on the visible NVIDIA GPU. Runs the demo end to end, then the decode, generation and
# LoRA train-step benchmarks against HF / torch + PEFT on the same GPU, and prints every figure with the GPU's
# name. A failed step is reported and the next one still runs; the exit code counts the failures.
#
#   bash scripts/gpu_check.sh [LOG_DIR]          (default LOG_DIR: gpu_check/)
#
# Installs the `cuda` extra first unless kdjax already imports and jax already sees a GPU (a machine without
# network must bring kdjax's dependencies itself). GSM8K is read from $KDJAX_GSM8K (default ../shared/data/gsm8k
# or openai/gsm8k from the hub); SmolLM2 is fetched into $KDJAX_CACHE as everywhere else.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-gpu_check}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
gsm8k=${KDJAX_GSM8K:-../shared/data/gsm8k}
[ -e "$gsm8k/test.jsonl" ] || gsm8k=openai/gsm8k

if ! python3 -c 'import jax, kdjax, sys; sys.exit(jax.devices()[0].platform != "gpu")' 2>/dev/null; then
  echo "gpu_check: installing kdjax[cuda]"
  python3 -m pip install -q torch && python3 -m pip install -q -e '.[cuda]' || { echo "gpu_check: install failed"; exit 1; }
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-unknown}"
python3 -c 'import jax, jaxlib, flax, torch, transformers; print(f"jax {jax.__version__} (jaxlib {jaxlib.__version__}, "
  f"{jax.devices()[0].device_kind}), flax {flax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'

failures=0
step() {  # step NAME TIMEOUT_S COMMAND...: runs it with its log in $log_dir/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$log_dir/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || { failures=$((failures + 1)); tail -n 15 "$log_dir/$name.log"; }
  return 0
}

work=$(mktemp -d)
step demo 420 python3 -m kdjax.main --config=configs/demo.py --config.workdir="$work/demo" \
  --config.data.source="$gsm8k"
grep -E "^\| |accuracy|wall|KD" "$work/demo/report/report.md" 2>/dev/null | head -20
step bench_decode 240 python3 -m benchmarks.bench_decode --gsm8k "$gsm8k" --batch-size 64 --new-tokens 256 \
  --torch-device cuda
grep -E "kdjax:|HF generate:|speed-up" "$log_dir/bench_decode.log"
if [ -f benchmarks/bench_generate.py ]; then
  step bench_generate 300 python3 -m benchmarks.bench_generate --gsm8k "$gsm8k" --torch-device cuda
  tail -n 6 "$log_dir/bench_generate.log"
fi
step bench_train 240 python3 -m benchmarks.bench_train --batch 8 --seq 512 --rounds 3 --torch-device cuda
grep -E "initial loss|KD step|speed-up" "$log_dir/bench_train.log"
echo "gpu_check: $failures step(s) failed on ${gpu:-unknown}"
exit "$failures"
