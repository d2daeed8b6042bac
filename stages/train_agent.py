"""Stage train-agent: the rest of DIAMOND's training loop (docs/architecture.md §3.5) for one game and one seed.

Starts from the `collect` dataset and the `train-world-model` checkpoint and runs the epoch loop
of `diamond.agent.loop` until the real-interaction budget is spent, then the final epochs. The whole
state lives in --state-dir and is checkpointed every `agent.checkpoint_every_epochs` epochs; a
rerun with the same params and inputs resumes from it (a different params or input hash starts
fresh, and says so). The outputs are written only on completion, each atomically.

    python -m stages.train_agent --params params.yaml --game Breakout --seed 0 \
        --dataset runs/Breakout-0/dataset_initial --world-model runs/Breakout-0/world_model.pt \
        --out-checkpoint runs/Breakout-0/agent.pt --out-dataset runs/Breakout-0/dataset \
        --out-metrics runs/Breakout-0/agent.json --out-curve runs/Breakout-0/agent_curve.csv \
        --state-dir runs/Breakout-0/agent_state
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from diamond.agent.checkpoint import agent_checkpoint, read_agent_checkpoint
from diamond.agent.loop import DATASET_DIR, STATE_FILE, AgentRun, curve_csv, load_state, saved_resume_key, train
from diamond.config import Params, to_dict
from diamond.data import EpisodeStore
from diamond.env.atari import num_actions
from diamond.io import ArtifactError, atomic_save_torch, atomic_write_bytes, atomic_write_json
from diamond.models.actor_critic import ActorCritic
from diamond.resume import resume_key
from diamond.seeds import AGENT_POLICY, AGENT_SEGMENTS, AGENT_TORCH, derived_seed, stream_rng
from diamond.training import Trainer, apply_speed_switches
from diamond.world_model.model import load_world_model, world_model_state
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.compute import compute_setup
from stages.run_tags import dvc_md5
from stages.tracking import stage_run

def sections(p: Params) -> dict:
    """The config this stage reads (and whose hash decides whether a saved state may resume)."""
    return stage_sections(p, "train-agent")


def run_key(p: Params, game: str, seed: int, dataset: Path, world_model: Path, init_agent: Path | None = None) -> str:
    """Hash of the params and inputs a run was started with; a saved state resumes only under it."""
    parts = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in sections(p).items()}
    parts.update(game=game, seed=seed, device=p.device, dataset=dvc_md5(dataset), world_model=dvc_md5(world_model))
    if init_agent is not None:
        parts["init_agent"] = dvc_md5(init_agent)
    return resume_key(**parts)


def build_run(
    p: Params, game: str, seed: int, store: EpisodeStore, world_model: Path, device: torch.device,
    init_agent: Path | None = None,
) -> AgentRun:
    torch.manual_seed(derived_seed(seed, AGENT_TORCH))
    n = num_actions(game)
    wm = load_world_model(world_model, device, cfg=p.world_model)
    if wm.num_actions != n:
        raise ArtifactError(f"{world_model}: world model has {wm.num_actions} actions, {game} has {n}")
    if wm.obs_size != p.env.obs_size:
        raise ArtifactError(f"{world_model}: world model of {wm.obs_size}x{wm.obs_size} frames, not env.obs_size={p.env.obs_size}")
    ac = ActorCritic(p.actor_critic, n, p.env.obs_size).to(device)
    if init_agent is not None:  # continue training an agent (e.g. imported official weights)
        ac.load_state_dict(read_agent_checkpoint(init_agent, game)["actor_critic"])
    apply_speed_switches(p, (wm.denoiser, wm.reward_end, ac), wm.denoiser.net)
    return AgentRun(
        params=p, game=game, seed=seed, device=device, store=store, world_model=wm,
        actor_critic=ac, actor_critic_trainer=Trainer(ac, p.actor_critic.optimizer),
        segment_rng=stream_rng(seed, AGENT_SEGMENTS),
        policy_rng=stream_rng(seed, AGENT_POLICY),
        initial_env_steps=store.num_steps, env_steps=store.num_steps,
    )


def start_or_resume(p: Params, args, key: str, device: torch.device) -> tuple[AgentRun, str]:
    state_dir: Path = args.state_dir
    saved = saved_resume_key(state_dir)
    if saved == key:
        store = EpisodeStore(state_dir / DATASET_DIR)
        run = load_state(build_run(p, args.game, args.seed, store, args.world_model, device, args.init_agent), state_dir)
        return run, f"resumed from {state_dir / STATE_FILE} at epoch {run.epoch}/{run.total_epochs}"
    why = "no saved state" if saved is None else f"saved state has params/input hash {saved}, this run {key}"
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    initial = EpisodeStore(args.dataset)
    store = initial.copy_to(state_dir / DATASET_DIR)
    if store.game != args.game:
        raise ArtifactError(f"{args.dataset}: dataset holds game {store.game!r}, not --game {args.game!r}")
    return build_run(p, args.game, args.seed, store, args.world_model, device, args.init_agent), f"started fresh ({why})"


def write_outputs(run: AgentRun, args, wall_seconds: float) -> dict:
    wm = run.world_model
    atomic_save_torch(args.out_checkpoint, agent_checkpoint(
        run.game, run.seed, run.actor_critic.num_actions, to_dict(run.params), run.actor_critic.state_dict(),
        world_model_state(wm),  # D and R as trained to the end of the loop
    ))
    run.store.copy_to(args.out_dataset, overwrite=True)
    tests = [r["test/return_mean"] for r in run.curve if "test/return_mean" in r]
    metrics = {
        "game": run.game, "seed": run.seed, "epochs": run.epoch, "env_steps": run.env_steps,
        "initial_env_steps": run.initial_env_steps, "episodes": len(run.store), "dataset_steps": run.store.num_steps,
        "model_free": run.params.agent.model_free, "final_test_return_mean": tests[-1] if tests else None,
        "actor_critic_steps": run.actor_critic_trainer.num_steps,
        "denoiser_steps": wm.denoiser_trainer.num_steps, "reward_end_steps": wm.reward_end_trainer.num_steps,
        "wall_seconds_this_process": wall_seconds,
    }
    atomic_write_json(args.out_metrics, metrics)
    atomic_write_bytes(args.out_curve, curve_csv(run))
    return metrics


def main() -> None:
    parser = base_parser("Train the agent in imagination: DIAMOND's epoch loop (docs/architecture.md §3.5).")
    parser.add_argument("--dataset", required=True, type=Path, help="initial dataset (stage collect)")
    parser.add_argument("--world-model", required=True, type=Path, help="world model checkpoint (stage train-world-model)")
    parser.add_argument("--out-checkpoint", required=True, type=Path)
    parser.add_argument("--out-dataset", required=True, type=Path, help="the final dataset (all real interaction)")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-curve", required=True, type=Path, help="per-epoch metrics CSV")
    parser.add_argument("--state-dir", required=True, type=Path, help="whole-state checkpoints, for resuming")
    parser.add_argument("--init-agent", type=Path, default=None,
                        help="start the actor-critic from this agent checkpoint (e.g. stages.import_official's) "
                             "instead of a fresh initialisation")
    args = parser.parse_args()
    p = load_checked_params(args)
    forget_provenance(args.out_checkpoint.parent, "train-agent")
    device, memory_tags = compute_setup(p)
    for path in (args.dataset, args.world_model, args.init_agent):
        if path is not None and not path.exists():
            raise ArtifactError(f"{path}: input not found")
    key = run_key(p, args.game, args.seed, args.dataset, args.world_model, args.init_agent)
    with stage_run("train-agent", sections=sections(p), game=args.game, seed=args.seed,
                   inputs=[args.dataset, args.world_model] + ([args.init_agent] if args.init_agent else []),
                   job_dir=args.out_checkpoint.parent):
        tracking.set_tags(memory_tags)
        run, how = start_or_resume(p, args, key, device)
        print(f"train-agent {args.game}-{args.seed}: {how}", flush=True)
        tracking.set_tag("resume", how)
        start = time.perf_counter()

        def on_epoch(row: dict) -> None:
            tracking.log_metrics({k.replace("/", "."): float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            print(f"epoch {int(row['epoch'])}/{run.total_epochs}: env_steps {row['env_steps']}"
                  + (f", test return {row['test/return_mean']:.1f}" if "test/return_mean" in row else ""), flush=True)

        train(run, args.state_dir, key, on_epoch)
        metrics = write_outputs(run, args, time.perf_counter() - start)
        tracking.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "seed"})
        for path in (args.out_metrics, args.out_curve):
            tracking.log_artifact(str(path))
        print(f"train-agent {args.game}-{args.seed}: {metrics['epochs']} epochs, {metrics['env_steps']} real steps, "
              f"{metrics['episodes']} episodes -> {args.out_checkpoint}")


if __name__ == "__main__":
    run_main(main)
