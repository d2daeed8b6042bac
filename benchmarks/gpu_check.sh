#!/usr/bin/env bash
# The GPU measurement of issue 28 as one call of at most 8 minutes: every part under its own
# timeout (450 s in all, plus 30 s for the report), most telling first; each part writes its
# JSON as it goes, so a part stopped by its timeout keeps the figures it took and the report
# gives null for the others. Within part 1 the official step and ours eager come before ours
# compiled, whose compilation (the U-Net inside the imagined step) is the least certain time.
#   1. (230 s) The actor-critic training step at the paper config, side by side in one process
#      (benchmarks/official_side_by_side.py --parts actor_critic_train_step --ours-compile both):
#      the official step (its compile_wm: torch.compile(mode="reduce-overhead") of its world-model
#      env), ours eager and ours with compile_imagination. Ours with compile_denoiser off, so that
#      "eager" is eager and the U-Net is compiled once, inside the imagined step.
#   2. (60 s) D's and R's training steps (benchmarks/bench.py --skip-actor-critic, TF32 and
#      channels-last as paper.yaml; D without compile_denoiser, whose compilation alone took over a
#      minute on an H200).
#   3. (160 s) K = 1, 2, 4, 8 concurrent train-agent-like processes on the GPU
#      (benchmarks/packed_throughput.py, eager, 10 s windows): actor-critic steps, imagined steps
#      and imagined frames per second summed over the K, and each process's peak memory.
# Then benchmarks/gpu_report.py writes OUT/reports/bench/<gpu>_<date>.json (the log beside it):
#   paper_run_hours  = (D steps x D step s + R steps x R step s + actor-critic steps x the faster of
#                       our eager and compiled actor-critic step s) / 3600, the steps of one run
#                       (one game, one seed) of configs/paper.yaml's schedule as benchmarks.bench
#                       counts them (first epoch: world_model.denoiser_steps, reward_end_steps,
#                       agent.first_epoch_actor_critic_steps; then agent.*_steps_per_epoch in each
#                       collecting and final epoch), as docs/results.md projected 142.8 h on an H200;
#   table1_gpu_hours = 130 x paper_run_hours / speedup(K) at the K of the highest speedup, where
#                       speedup(K) = the K processes' summed actor-critic steps/s over one's
#                       (26 games x 5 seeds; D and R taken to pack as the actor-critic).
# Prepare here: `bash benchmarks/gpu_wheels.sh` (wheels of what the GPU image lacks, into .whl/)
# and a checkout of the official code in .official/ (git-ignored; the GPU machine has no internet):
#     git clone https://github.com/eloialonso/diamond .official   (or any checkout of its main branch)
# then, on the GPU machine, with .whl and .official carried beside the working tree:
#     bash benchmarks/gpu_check.sh "$OUT"
# Dry run on a CPU at a tiny config (ours only unless OFFICIAL names a checkout; under a minute on
# 2 cores, compiled without inductor, see below; tests/test_bench.py runs it):
#     bash benchmarks/gpu_check.sh --dry-run "$OUT"
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT/parts" "$OUT/reports/bench"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import gymnasium, ale_py, mlflow" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/* || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DATE=$(date -u +%F)
if [ "$DRY" = 1 ]; then
  # params.yaml (the CPU config) cut down: every code path, seconds per part, no official code.
  # Compiled with backend aot_eager unless COMPILE_BACKEND=inductor: dynamo's full-graph capture
  # and AOTAutograd, without inductor's code generation, which for the imagined step alone takes
  # about a minute on 2 cores (inductor's results: tests/test_imagination.py, compiled test).
  OFFICIAL=${OFFICIAL:-} COMPILE_BACKEND=${COMPILE_BACKEND:-aot_eager}
  DEVICE=cpu GPU=cpu-dry-run PARAMS=params.yaml
  SET=(--set actor_critic.batch_size=2 --set actor_critic.horizon=2 --set compile_denoiser=false)
  SIDE_ARGS=(--batch-size 2 --repeats 1 --threads 1) BENCH_ARGS=(--batch-size 2 --obs-size 32 --reps 1 --matmul-size 256 --threads 1)
  PACK_ARGS=(--ks 1 2 --seconds 2 --worker-timeout 60) T1=120 T2=60 T3=90
else
  OFFICIAL=${OFFICIAL:-.official} COMPILE_BACKEND=inductor
  DEVICE=cuda GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) PARAMS=configs/paper.yaml
  SET=(--set compile_denoiser=false)
  SIDE_ARGS=(--repeats 2) BENCH_ARGS=(--reps 3 --tf32 --channels-last)
  PACK_ARGS=(--ks 1 2 4 8 --seconds 10 --worker-timeout 70) T1=230 T2=60 T3=160
fi
SLUG=$("$PY" -c "import sys; from benchmarks.gpu_report import gpu_slug; print(gpu_slug(sys.argv[1]))" "${GPU:-unknown}")
LOG="$OUT/reports/bench/${SLUG}_${DATE}.log"
{
  echo "gpu_check: commit $COMMIT, $DATE, device $DEVICE ($GPU), params $PARAMS ${SET[*]}, compile backend $COMPILE_BACKEND"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  OFFICIAL_ARG=()
  if [ -n "$OFFICIAL" ] && [ -d "$OFFICIAL/src" ]; then OFFICIAL_ARG=(--official "$OFFICIAL")
  else echo "gpu_check: no official checkout at '${OFFICIAL}' (set OFFICIAL, or carry .official); ours only"; fi
  echo "== part 1: actor-critic step side by side (timeout $T1 s)"
  timeout "$T1" "$PY" -m benchmarks.official_side_by_side "${OFFICIAL_ARG[@]}" --device "$DEVICE" --params "$PARAMS" \
    "${SET[@]}" --parts actor_critic_train_step --ours-compile both --compile-backend "$COMPILE_BACKEND" "${SIDE_ARGS[@]}" --json "$OUT/parts/side_by_side.json"
  echo "== part 1 exit $?"
  echo "== part 2: D and R steps (timeout $T2 s)"
  timeout "$T2" "$PY" -m benchmarks.bench --device "$DEVICE" --config "$PARAMS" --skip-actor-critic "${BENCH_ARGS[@]}" \
    --json "$OUT/parts/bench.json"
  echo "== part 2 exit $?"
  echo "== part 3: K concurrent processes (timeout $T3 s)"
  timeout "$T3" "$PY" -m benchmarks.packed_throughput --device "$DEVICE" --params "$PARAMS" "${SET[@]}" "${PACK_ARGS[@]}" \
    --json "$OUT/parts/packed.json"
  echo "== part 3 exit $?"
  timeout 30 "$PY" -m benchmarks.gpu_report --out "$OUT" --gpu "$GPU" --date "$DATE" --commit "$COMMIT" --params "$PARAMS" \
    --side-by-side "$OUT/parts/side_by_side.json" --bench "$OUT/parts/bench.json" --packed "$OUT/parts/packed.json"
} 2>&1 | tee "$LOG"
