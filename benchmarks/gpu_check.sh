#!/usr/bin/env bash
# The GPU measurement of issue 20 as one command (< 10 min on one H200; every part has its own
# timeout, 540 s in all), most telling first: the step benchmark (benchmarks/bench.py: D, R and
# actor-critic steps in fp32 and bf16, the actor-critic step eager and with compile_imagination),
# the side by side with the official code (benchmarks/official_side_by_side.py, when a checkout is
# at $OFFICIAL, default .official), fp32 vs bf16 actor-critic training at the paper config
# (benchmarks/bf16_actor_critic.py, 20 steps per run) and last the paper-config smoke through the
# real stages (benchmarks/gpu_smoke.py, preset gpu, fewer actor-critic steps).
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
  # Most telling first: per-step times, eager vs compile_imagination (120 s on an H200 without
  # --compile, whose U-Net compilation alone took over a minute; docs/results.md, "GPU measurement").
  timeout 150 "$PY" -m benchmarks.bench --device cuda --json "$OUT/bench.json" --bf16 --compile-imagination --reps 2
  if [ -d "$OFFICIAL/src" ]; then
    timeout 130 "$PY" -m benchmarks.official_side_by_side --official "$OFFICIAL" --device cuda --repeats 3 --json "$OUT/side_by_side.json"
  else
    echo "gpu_check: no official checkout at $OFFICIAL (set OFFICIAL, or carry .official); side by side skipped"
  fi
  timeout 110 "$PY" -m benchmarks.bf16_actor_critic --params configs/paper.yaml --device cuda --steps 20 --tail 8 --json "$OUT/bf16_actor_critic.json"
  # The stages end to end, last, with the actor-critic steps cut further (1.1 s each on an H200).
  timeout 150 "$PY" -m benchmarks.gpu_smoke --out "$OUT/smoke" --set agent.first_epoch_actor_critic_steps=10 \
    --set agent.actor_critic_steps_per_epoch=20 && cp "$OUT/smoke/gpu_smoke.json" "$OUT/"
} 2>&1 | tee "$OUT/gpu_check.log"
