"""Smoke of a params file through the real stages, with step counts cut, and the run it projects.

Runs collect -> train-world-model -> train-agent -> evaluate (the stage modules themselves,
`python -m stages.<name>`, each in its own process, MLflow into a store under --out) for one game
and seed, on a config derived from --config (default configs/paper.yaml) by the preset's
overrides (`--set key=value` adds more). Reports, in --out/gpu_smoke.json and on stdout:
- each stage's wall time and peak memory (CUDA: max allocated; and the process's max resident set);
- the last agent epoch (a collecting epoch, after compilation warm-up) split into collect / D / R /
  actor-critic / test episodes (diamond.agent.loop.run_epoch's `seconds/<phase>`), and per-step times;
- `projected_run_hours`: one run of --config's own schedule (one game, one seed;
  benchmarks.bench.run_schedule) from those per-step times, the measured collection and test
  episodes scaled by their counts, and the evaluate stage plus the paper's further episodes.
  Untrained agents' test episodes are not a trained agent's length: the test and evaluate parts
  are indicative; D, R and the actor-critic (`projected_run_hours_training`) are the bulk.

    python -m benchmarks.gpu_smoke --out /tmp/smoke                            # paper config, preset gpu (< 10 min on one H200)
    python -m benchmarks.gpu_smoke --config params.yaml --preset tiny --out /tmp/smoke   # CPU, a minute
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

import yaml

from diamond.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]

# Step counts cut from the paper's (docs/architecture.md §3.5): an initial collection, the first
# epoch's D and R, then epoch 0 (actor-critic only) and two collecting epochs of 100 env steps.
# The actor-critic steps are fewer than the paper's 400 per epoch so that even eager fp32 (0.93 s a
# step on an H200, issue 20) keeps the whole smoke under 10 minutes; the per-step time is what counts.
PRESETS: dict[str, dict[str, object]] = {
    "gpu": {
        "collect.min_steps": 1000, "collect.max_steps": 1000,
        "world_model.denoiser_steps": 200, "world_model.reward_end_steps": 200,
        "agent.total_env_steps": 1200, "agent.collect_steps_per_epoch": 100,
        "agent.first_epoch_actor_critic_steps": 40, "agent.actor_critic_steps_per_epoch": 120,
        "agent.denoiser_steps_per_epoch": 200, "agent.reward_end_steps_per_epoch": 200,
        "agent.final_epochs_without_collection": 0, "agent.test_every_epochs": 1, "agent.checkpoint_every_epochs": 1,
        "evaluate.episodes": 4, "evaluate.fidelity_episodes": 1, "evaluate.gif_frames": 20,
    },
    # For a CPU test: seconds per stage with the small networks of params.yaml.
    "tiny": {
        "collect.min_steps": 200, "collect.max_steps": 200, "collect.chunk_steps": 100,
        "world_model.denoiser_steps": 4, "world_model.reward_end_steps": 4, "world_model.batch_size": 2,
        "agent.total_env_steps": 240, "agent.collect_steps_per_epoch": 20,
        "agent.first_epoch_actor_critic_steps": 2, "agent.actor_critic_steps_per_epoch": 2,
        "agent.denoiser_steps_per_epoch": 3, "agent.reward_end_steps_per_epoch": 3,
        "agent.final_epochs_without_collection": 0, "agent.test_every_epochs": 1, "agent.test_episodes": 1,
        "agent.checkpoint_every_epochs": 1, "actor_critic.batch_size": 2, "actor_critic.horizon": 3,
        "evaluate.episodes": 1, "evaluate.num_envs": 1, "evaluate.fidelity_episodes": 1,
        "evaluate.fidelity_horizons": [1], "evaluate.gif_frames": 5,
    },
}
PHASES = ("collect", "denoiser", "reward_end", "actor_critic", "test")


def set_key(data: dict, dotted: str, value: object) -> None:
    """Set `a.b.c` in nested `data`; the key must exist (a typo is a one-line error)."""
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise SystemExit(f"--set {dotted}: no section {key!r} in the params file")
        node = node[key]
    if last not in node:
        raise SystemExit(f"--set {dotted}: no key {last!r}; allowed here: {', '.join(sorted(node))}")
    node[last] = value


def smoke_params(base: dict, game: str, seed: int, overrides: dict[str, object]) -> dict:
    data = json.loads(json.dumps(base))  # a deep copy
    data["games"], data["seeds"] = [game], [seed]
    data["released"]["games"] = []
    for key, value in overrides.items():
        set_key(data, key, value)
    return data


def run_stage(out: Path, name: str, module: str, argv: list[str], env: dict[str, str]) -> dict:
    """Run `python -m module argv` in its own process through `--run-stage` (which records its
    peak memory); returns its wall time and memory."""
    mem = out / f"{name}.memory.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_smoke", "--run-stage", str(mem), module, *argv]
    print(f"[gpu_smoke] {name}: python -m {module} {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"gpu_smoke: stage {name} failed (exit {done.returncode}); its output is above")
    return {"seconds": seconds, **json.loads(mem.read_text())}


def stage_with_memory(mem_json: str, module: str, argv: list[str]) -> None:
    """`--run-stage`: run a stage module as `python -m` would, then write its peak memory."""
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        Path(mem_json).write_text(json.dumps({
            "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }))


def read_curve(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def epoch_split(row: dict[str, float], p: Params) -> dict[str, float]:
    """A measured epoch's phases and the per-step times they give."""
    a = p.agent
    out = {f"epoch_{k}_s": row.get(f"seconds/{k}", 0.0) for k in PHASES}
    out["epoch_s"] = row["epoch_seconds"]
    out["denoiser_step_s"] = out["epoch_denoiser_s"] / max(a.denoiser_steps_per_epoch, 1)
    out["reward_end_step_s"] = out["epoch_reward_end_s"] / max(a.reward_end_steps_per_epoch, 1)
    out["actor_critic_step_s"] = out["epoch_actor_critic_s"] / max(a.actor_critic_steps_per_epoch, 1)
    return out


def project(split: dict[str, float], stages: dict[str, dict], smoke: Params, paper: Params) -> dict[str, float]:
    """Hours of one run of `paper`'s schedule from the smoke's measured per-step and per-episode times."""
    from benchmarks.bench import run_schedule

    sched = run_schedule(paper)
    collect_step_s = split["epoch_collect_s"] / max(smoke.agent.collect_steps_per_epoch, 1)
    test_episode_s = split["epoch_test_s"] / max(smoke.agent.test_episodes, 1)
    parts = {
        # the agent's collection rate stands for the uniform policy's (a little slower: it runs the actor-critic)
        "initial_collect": sched.initial_env_steps * collect_step_s,
        "denoiser": sched.denoiser_steps * split["denoiser_step_s"],
        "reward_end": sched.reward_end_steps * split["reward_end_step_s"],
        "actor_critic": sched.actor_critic_steps * split["actor_critic_step_s"],
        "collect": sched.collect_epochs * paper.agent.collect_steps_per_epoch * collect_step_s,
        "test": (sched.epochs // paper.agent.test_every_epochs) * paper.agent.test_episodes * test_episode_s,
        # the smoke's evaluate stage (start-up, fidelity, its episodes), plus the paper's further
        # episodes at the training loop's one-at-a-time rate (evaluate batches them: an upper bound)
        "evaluate": stages["evaluate"]["seconds"]
        + max(paper.evaluate.episodes - smoke.evaluate.episodes, 0) * test_episode_s,
    }
    out = {f"projected_run_hours_{k}": v / 3600 for k, v in parts.items()}
    out["projected_run_hours"] = sum(parts.values()) / 3600
    out["projected_run_hours_training"] = (parts["denoiser"] + parts["reward_end"] + parts["actor_critic"]) / 3600
    out["projected_run_epochs"] = sched.epochs
    return out


def run(args: argparse.Namespace) -> dict:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(PRESETS[args.preset])
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    base = yaml.safe_load(args.config.read_text())
    params_path = out / "params.yaml"
    params_path.write_text(yaml.safe_dump(smoke_params(base, args.game, args.seed, overrides), sort_keys=False))
    smoke, paper = load_params(params_path), load_params(args.config)
    run_dir = out / "runs" / f"{args.game}-{args.seed}"
    common = ["--params", str(params_path), "--game", args.game, "--seed", str(args.seed)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    stages = {}
    t0 = time.perf_counter()
    stages["collect"] = run_stage(out, "collect", "stages.collect", [
        *common, "--out-dataset", str(run_dir / "dataset_initial"), "--out-stats", str(run_dir / "collect.json")], env)
    stages["train_world_model"] = run_stage(out, "train_world_model", "stages.train_world_model", [
        *common, "--dataset", str(run_dir / "dataset_initial"), "--out-checkpoint", str(run_dir / "world_model.pt"),
        "--out-metrics", str(run_dir / "world_model.json"), "--out-curve", str(run_dir / "world_model_curve.csv"),
        "--out-media", str(run_dir / "world_model_media")], env)
    stages["train_agent"] = run_stage(out, "train_agent", "stages.train_agent", [
        *common, "--dataset", str(run_dir / "dataset_initial"), "--world-model", str(run_dir / "world_model.pt"),
        "--out-checkpoint", str(run_dir / "agent.pt"), "--out-dataset", str(run_dir / "dataset"),
        "--out-metrics", str(run_dir / "agent.json"), "--out-curve", str(run_dir / "agent_curve.csv"),
        "--state-dir", str(run_dir / "agent_state")], env)
    stages["evaluate"] = run_stage(out, "evaluate", "stages.evaluate", [
        *common, "--agent", str(run_dir / "agent.pt"), "--dataset", str(run_dir / "dataset"),
        "--out-score", str(run_dir / "score.json"), "--out-fidelity", str(run_dir / "evaluate_fidelity.json"),
        "--out-media", str(run_dir / "evaluate_media")], env)
    curve = read_curve(run_dir / "agent_curve.csv")
    measured = curve[-1]  # the last collecting epoch: D, R and the actor-critic compiled and warm
    split = epoch_split(measured, smoke)
    import torch

    result: dict = {
        "config": str(args.config), "preset": args.preset, "overrides": overrides, "game": args.game, "seed": args.seed,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "smoke_seconds": time.perf_counter() - t0,
        "measured_epoch": int(measured["epoch"]),
        "epochs": [{k: v for k, v in row.items() if k == "epoch" or k.startswith("seconds/") or k == "epoch_seconds"}
                   for row in curve],
    }
    for name, s in stages.items():
        result.update({f"stage_{name}_{k}": v for k, v in s.items()})
    gpu = [s["peak_gpu_memory_mb"] for s in stages.values() if s["peak_gpu_memory_mb"] is not None]
    result["peak_gpu_memory_mb"] = max(gpu) if gpu else None
    result.update(split)
    result.update(project(split, stages, smoke, paper))
    from diamond.io import atomic_write_json

    atomic_write_json(out / "gpu_smoke.json", result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder: params, runs, MLflow store, gpu_smoke.json")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.yaml", help="params file to cut and project")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu", help="the step counts cut")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more override (YAML value)")
    p.add_argument("--game", default="Breakout")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-stage"]:
        stage_with_memory(argv[1], argv[2], argv[3:])
        return
    result = run(parse_args(argv))
    for k, v in result.items():
        if k not in ("epochs", "overrides"):
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
