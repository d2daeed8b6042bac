#!/usr/bin/env bash
# The GPU measurement of issue 20 as one command (< 10 min on one H200; every part has its own
# timeout, 560 s in all): the paper-config smoke through the real stages (benchmarks/gpu_smoke.py,
# preset gpu), the step benchmark (benchmarks/bench.py: D, R and actor-critic steps in fp32 and
# bf16, channels-last, compiled U-Net, actor-critic step eager and with compile_imagination), the
# side by side with the official code (benchmarks/official_side_by_side.py, when a checkout is at
# $OFFICIAL, default .official) and fp32 vs bf16 actor-critic training at the paper config
# (benchmarks/bf16_actor_critic.py, 30 steps per run: ~0.9 s each).
# Prepare here: `bash benchmarks/gpu_wheels.sh` (wheels of what the GPU image lacks, into .whl/)
# and a checkout of the official code in .official/ (git-ignored; the GPU machine has no internet):
#     git clone https://github.com/eloialonso/diamond .official   (or any checkout of its main branch)
# then, on the GPU machine, with .whl and .official copied beside the working tree, run
#     bash benchmarks/gpu_check.sh "$OUT"
# Results: OUT/gpu_smoke.json, OUT/bench.json, OUT/side_by_side.json, OUT/bf16_actor_critic.json,
# OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
OFFICIAL=${OFFICIAL:-.official}
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
  timeout 300 "$PY" -m benchmarks.gpu_smoke --out "$OUT/smoke" && cp "$OUT/smoke/gpu_smoke.json" "$OUT/"
  timeout 75 "$PY" -m benchmarks.bench --device cuda --json "$OUT/bench.json" --bf16 --channels-last --compile --compile-imagination --reps 2
  if [ -d "$OFFICIAL/src" ]; then
    timeout 110 "$PY" -m benchmarks.official_side_by_side --official "$OFFICIAL" --device cuda --repeats 3 --json "$OUT/side_by_side.json"
  else
    echo "gpu_check: no official checkout at $OFFICIAL (set OFFICIAL, or carry .official); side by side skipped"
  fi
  timeout 75 "$PY" -m benchmarks.bf16_actor_critic --params configs/paper.yaml --device cuda --steps 30 --tail 10 --json "$OUT/bf16_actor_critic.json"
} 2>&1 | tee "$OUT/gpu_check.log"
