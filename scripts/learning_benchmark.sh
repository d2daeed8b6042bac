#!/usr/bin/env bash
# Learning benchmark (issue 4, point 5): one game, one seed, collect -> train-world-model ->
# train-agent -> evaluate with a small config, then the agent's and the uniform random policy's
# mean test score with 95% bootstrap intervals, and the wall time.
#
#   bash scripts/learning_benchmark.sh [PARAMS] [GAME] [SEED] [OUT_DIR]
#   defaults:  configs/small_learning.yaml Asterix 0 runs/benchmark
#
# Both scores use evaluate.episodes test episodes (>= 30) of the real game (no life-loss
# termination); the random policy plays on its own environment seed. Results also go to
# OUT_DIR/GAME-SEED/benchmark.json. Torch threads: OMP_NUM_THREADS (default 1, for a shared CPU;
# for the 60-minute figure run it alone on the machine with OMP_NUM_THREADS=2).
set -euo pipefail

PARAMS=${1:-configs/small_learning.yaml}
GAME=${2:-Asterix}
SEED=${3:-0}
OUT=${4:-runs/benchmark}
RUN="$OUT/$GAME-$SEED"
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
mkdir -p "$RUN"
ARGS=(--params "$PARAMS" --game "$GAME" --seed "$SEED")
START=$(date +%s)

"$PY" -m stages.collect "${ARGS[@]}" --out-dataset "$RUN/dataset_initial" --out-stats "$RUN/collect.json"
"$PY" -m stages.train_world_model "${ARGS[@]}" --dataset "$RUN/dataset_initial" \
  --out-checkpoint "$RUN/world_model.pt" --out-metrics "$RUN/world_model.json" \
  --out-curve "$RUN/world_model_curve.csv" --out-media "$RUN/world_model_media"
"$PY" -m stages.train_agent "${ARGS[@]}" --dataset "$RUN/dataset_initial" --world-model "$RUN/world_model.pt" \
  --out-checkpoint "$RUN/agent.pt" --out-dataset "$RUN/dataset" --out-metrics "$RUN/agent.json" \
  --out-curve "$RUN/agent_curve.csv" --state-dir "$RUN/agent_state"
"$PY" -m stages.evaluate "${ARGS[@]}" --agent "$RUN/agent.pt" --dataset "$RUN/dataset" \
  --out-score "$RUN/score.json" --out-fidelity "$RUN/evaluate_fidelity.json" --out-media "$RUN/evaluate_media"
PIPELINE_SECONDS=$(( $(date +%s) - START ))

"$PY" - "$PARAMS" "$GAME" "$SEED" "$RUN" "$PIPELINE_SECONDS" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from diamond.env.collector import UniformPolicy
from diamond.config import load_params
from diamond.env.atari import num_actions
from diamond.agent.evaluation import test_episode_returns
from diamond.io import atomic_write_json, read_json
from diamond.agent.loop import derived_seed

params_file, game, seed, run, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
p = load_params(params_file)
agent = np.array(read_json(run / "score.json")["episode_returns"], dtype=float)
policy = UniformPolicy(num_actions(game), np.random.default_rng(derived_seed(seed, 31)))
uniform = np.array(test_episode_returns(game, derived_seed(seed, 32), p.env, policy, len(agent)), dtype=float)


def ci(x: np.ndarray) -> tuple[float, float]:
    res = bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=10_000, method="percentile",
                    random_state=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


a_ci, u_ci = ci(agent), ci(uniform)
out = {
    "game": game, "seed": seed, "params": params_file, "episodes": len(agent), "pipeline_seconds": seconds,
    "agent_mean": float(agent.mean()), "agent_ci95": a_ci,
    "uniform_mean": float(uniform.mean()), "uniform_ci95": u_ci, "uniform_returns": uniform.tolist(),
    "agent_ci_excludes_uniform_mean": not (a_ci[0] <= uniform.mean() <= a_ci[1]),
    "agent_beats_uniform": bool(a_ci[0] > uniform.mean()),
}
atomic_write_json(run / "benchmark.json", out)
print(f"{game} seed {seed}, {len(agent)} test episodes each, pipeline wall time {seconds} s ({seconds / 60:.1f} min)")
print(f"  agent  : mean {agent.mean():8.2f}  95% bootstrap CI [{a_ci[0]:.2f}, {a_ci[1]:.2f}]")
print(f"  uniform: mean {uniform.mean():8.2f}  95% bootstrap CI [{u_ci[0]:.2f}, {u_ci[1]:.2f}]")
print(f"  agent beats uniform (agent CI above the uniform mean): {out['agent_beats_uniform']}")
EOF
