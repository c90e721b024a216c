#!/usr/bin/env bash
# The GPU benchmarks in one script for the device tool, within 8 minutes on one GPU:
#   throughput_gpu      MLP, CIFAR ConvNet, ResNet-20 vs PyTorch (NCHW and channels_last), float32
#   throughput_gpu_bf16 the same in bfloat16 mixed precision
#                       (both: model FLOPs per step, achieved TFLOP/s, fraction of the measured matmul peak)
#   steps_gpu           host batches vs device-resident data at K = 1, 8, 32 steps per call
#   population_gpu      populations of K = 4, 16, 64 members vs K sequential runs
# It uses the machine's own python3 (jax with CUDA, flax, optax, torch) with dlcore from this checkout on
# PYTHONPATH, since nothing can be installed there. Results and the log go to $OUT (the device tool's folder),
# else benchmarks/results. TORCH_COMPILE=1 adds torch.compile runners (minutes of compiling per model).
# DEVICE=cpu QUICK=1 runs the same commands briefly on the CPU, to check the script itself.
#   device tool: run(command="bash benchmarks/gpu.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
device="${DEVICE:-gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu.log"
common=(--device="$device" --out_dir="$out")
throughput=(--nomemory --nopipeline --windows=5 --window_s=0.5)
steps=(--sections=paths --windows=3 --window_s=0.5)
pop=(--windows=2)
if [[ "${QUICK:-0}" == 1 ]]; then
  throughput=(--nomemory --nopipeline --quick --models=mlp)
  steps=(--sections=paths --quick --cases=bn_study --steps_per_call=1,8)
  pop=(--windows=1 --cases=bn_study --sizes=4 --steps=32)
fi
[[ "${TORCH_COMPILE:-0}" == 1 ]] || throughput+=(--notorch_compile)
status=0
run() {  # run LIMIT_S ARGS...: one benchmark under a time limit, its output appended to the log
  local limit="$1"; shift
  echo "+ $py $*" | tee -a "$log"
  timeout "$limit" "$py" "$@" 2>&1 | tee -a "$log" || { echo "FAILED ($?): $*" | tee -a "$log"; status=1; }
}
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$py" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"; } \
  2>&1 | tee "$log"
run 150 benchmarks/throughput.py "${common[@]}" "${throughput[@]}" --tag="throughput_$device"
run 120 benchmarks/throughput.py "${common[@]}" "${throughput[@]}" --dtype=bfloat16 --tag="throughput_${device}_bf16"
run 90 benchmarks/steps.py "${common[@]}" "${steps[@]}" --tag="steps_$device"
run 90 benchmarks/population.py "${common[@]}" "${pop[@]}" --tag="population_$device"
exit $status
