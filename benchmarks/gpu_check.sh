#!/usr/bin/env bash
# The GPU measurement of issue 20 as one command (< 10 min on one H200): the paper-config smoke
# through the real stages (benchmarks/gpu_smoke.py, preset gpu) and, in the time left, the step
# benchmark (benchmarks/bench.py: D, R and actor-critic steps in fp32 and bf16, channels-last,
# compiled). Prepare here: `bash benchmarks/gpu_wheels.sh` (wheels of what the GPU image lacks,
# into .whl/); then, on the device machine, carry .whl and run
#     bash benchmarks/gpu_check.sh "$OUT"
# Results: OUT/gpu_smoke.json, OUT/bench.json, OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import gymnasium, ale_py, mlflow" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/* || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  timeout 420 "$PY" -m benchmarks.gpu_smoke --out "$OUT/smoke" && cp "$OUT/smoke/gpu_smoke.json" "$OUT/"
  timeout 150 "$PY" -m benchmarks.bench --device cuda --json "$OUT/bench.json" --bf16 --channels-last --compile --compile-imagination --reps 3
} 2>&1 | tee "$OUT/gpu_check.log"
