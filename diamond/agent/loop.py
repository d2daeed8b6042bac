"""The DIAMOND epoch loop after the first world-model epoch (docs/architecture.md §3.5), with whole-state resume.

Epoch 0 trains the actor-critic alone for `first_epoch_actor_critic_steps` (the first epoch's
denoiser and reward/termination training is the `train-world-model` stage). Every later epoch
collects `collect_steps_per_epoch` real steps with the current policy (epsilon-greedy, sampled at
the game's `collect_temperature`) into the dataset, then trains the denoiser, the
reward/termination model and the actor-critic for their steps per epoch, until the
real-interaction budget (`total_env_steps`, initial collection included) is spent; then
`final_epochs_without_collection` epochs train without collecting.

Resume (the scheme of diamond/resume.py, shared with diamond/world_model/loop.py). The whole state (models, optimisers, epoch, step counts, the dataset's episode count,
numpy and torch random states, and the collection in progress: the emulator's state with its
random state, the unfinished episode's frames and the policy's LSTM state; and, when imagined
rows go on across updates, the rows in progress) is saved atomically
every `checkpoint_every_epochs` epochs, so a resumed run continues the very game it was playing
and collects exactly the episodes of an uninterrupted run. Episodes a killed run appended after
its last checkpoint are dropped on resume, and the episode in progress is put back as it was at
the checkpoint (they are collected again, identically). Games are cut only where the budget is
spent: the episode in progress is then stored as truncated.

The episode in progress is in the dataset after every collection call (neither terminated nor
truncated), replaced as it grows, as official src/coroutines/collector.py does: D, R and the
imagination's starts sample the newest steps at once, not only once their episode has ended.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diamond.agent.evaluation import test_episode_returns
from diamond.agent.imagination import ImaginationEnv
from diamond.agent.policy import AgentPolicy, compiled_forward, imagination_loss, real_data_loss
from diamond.config import Params
from diamond.data import EpisodeStore, SegmentSampler
from diamond.data.resave import training_episodes
from diamond.data.sampler import denoiser_placement, reward_end_placement
from diamond.env.atari import make_env
from diamond.env.collector import Collector
from diamond.io import ArtifactError, atomic_save_torch, load_torch
from diamond.models.actor_critic import ActorCritic
from diamond.progress import Progress
from diamond.resume import RESUME_KEY, curve_csv_bytes, restore_rng_state, rng_state
from diamond.seeds import AGENT_TEST_ENV, AGENT_TEST_POLICY, AGENT_TRAIN_ENV, derived_seed
from diamond.training import Trainer, train_steps
from diamond.world_model.model import WorldModel

STATE_FILE = "state.pt"
DATASET_DIR = "dataset"


@dataclass
class AgentRun:
    """Everything the loop reads and changes; what `save_state` writes and `load_state` restores."""

    params: Params
    game: str
    seed: int
    device: torch.device
    store: EpisodeStore
    world_model: WorldModel
    actor_critic: ActorCritic
    actor_critic_trainer: Trainer
    segment_rng: np.random.Generator  # segment sampling for all three models
    policy_rng: np.random.Generator  # the collecting policy's action draws
    initial_env_steps: int  # steps in the dataset from the `collect` stage
    env_steps: int  # real steps so far, initial collection included
    epoch: int = 0  # epochs completed
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    collector: Collector | None = None  # the game in progress; its state is saved with the run
    # built at the first actor-critic step and kept, so that compiled code (compile_imagination)
    # is compiled once per process; not saved
    imagination: ImaginationEnv | None = None
    actor_critic_forward: Callable[..., Any] | None = None
    # A resumed run's imagined rows in progress (params actor_critic.continue_rows_across_updates),
    # put into the ImaginationEnv when it is built
    imagination_state: dict[str, Any] | None = None

    @property
    def collect_epochs(self) -> int:
        return self.params.agent.collect_epochs(self.initial_env_steps)

    @property
    def total_epochs(self) -> int:
        return 1 + self.collect_epochs + self.params.agent.final_epochs_without_collection

    @property
    def done(self) -> bool:
        return self.epoch >= self.total_epochs


def _segments(run: AgentRun) -> SegmentSampler:
    """D's training segments and the imagination starts (world_model.denoiser's placement)."""
    episodes = training_episodes(run.store, run.params.world_model.training_frames)
    return SegmentSampler(episodes, run.segment_rng, placement=denoiser_placement(run.params.world_model.denoiser))


def _reward_end_segments(run: AgentRun) -> tuple[SegmentSampler, int]:
    """R's sampler (same random stream) and steps per segment (world_model.reward_end.segment_window)."""
    placement, steps = reward_end_placement(run.params.world_model.reward_end)
    episodes = training_episodes(run.store, run.params.world_model.training_frames)
    return SegmentSampler(episodes, run.segment_rng, placement=placement), steps


def _new_collector(run: AgentRun) -> Collector:
    """The agent's collector: one training environment for the whole run, seeded from the seed."""
    env = make_env(run.game, derived_seed(run.seed, *AGENT_TRAIN_ENV), train=True, config=run.params.env)
    policy = AgentPolicy(run.actor_critic, run.params.agent.epsilon, run.policy_rng, run.device,
                         temperature=run.params.agent.collect_temperature_of(run.game))
    return Collector(env, policy, run.store, store_in_progress=True,
                     record_writes=run.params.world_model.training_frames == "resaved_per_write")


def _collect(run: AgentRun, num_steps: int) -> list[Any]:
    """Collect with the current policy, continuing the game in progress."""
    if run.collector is None:
        run.collector = _new_collector(run)
    run.actor_critic.eval()
    stats = run.collector.collect(num_steps)
    run.env_steps += num_steps
    if run.env_steps >= run.params.agent.total_env_steps:
        _cut_collection(run)  # the budget is spent: store the episode in progress
    return stats


def _collection_state(run: AgentRun) -> dict[str, Any] | None:
    c = run.collector
    if c is None:
        return None
    return {"env": c.env.unwrapped.get_state(), "episode": c.get_state(), "policy_state": c.policy.state}


def _restore_collection(run: AgentRun, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    run.collector = _new_collector(run)
    run.collector.env.unwrapped.set_state(state["env"])
    run.collector.set_state(state["episode"])
    run.collector.policy.state = state["policy_state"]


def _cut_collection(run: AgentRun) -> None:
    """Store the episode in progress (truncated) and drop the environment."""
    if run.collector is not None:
        run.collector.flush()
        run.collector.env.close()
        run.collector = None


def _train_actor_critic(run: AgentRun, num_steps: int) -> dict[str, float]:
    if num_steps == 0:
        return {}
    p, wm = run.params, run.world_model
    context = p.world_model.denoiser.num_conditioning_frames
    segments = _segments(run)
    if run.imagination is None:
        run.imagination = ImaginationEnv(
            wm.sampler, wm.reward_end, segments, context,
            p.actor_critic.batch_size, p.actor_critic.horizon, run.device, compile=p.compile_imagination,
        )
        if p.compile_imagination:
            run.actor_critic_forward = compiled_forward(run.actor_critic)
        run.imagination.load_state_dict(run.imagination_state)
        run.imagination_state = None
    imagination = run.imagination
    imagination.segments = segments
    wm.denoiser.eval()
    wm.reward_end.eval()
    run.actor_critic.train()
    metrics: dict[str, float] = {}
    progress = Progress(f"train-agent {run.game}-{run.seed} epoch {run.epoch}: actor-critic", num_steps)
    for _ in range(num_steps):
        if p.agent.model_free:
            # Our own ablation, on our placement and the exact frames whatever the official switches say.
            real = SegmentSampler(run.store, run.segment_rng)
            loss, metrics = real_data_loss(run.actor_critic, real, p.actor_critic, context, run.device)
        else:
            loss, metrics = imagination_loss(run.actor_critic, imagination, p.actor_critic, run.actor_critic_forward)
        metrics = {**metrics, **run.actor_critic_trainer.step(loss)}
        progress.update()
    progress.close()
    return metrics


def _train_world_model(run: AgentRun, seconds: dict[str, float]) -> dict[str, float]:
    """One epoch of D and R (skipped in the model-free ablation, which never uses them); their
    times go into `seconds` ("denoiser", "reward_end")."""
    p, wm = run.params, run.world_model
    if p.agent.model_free:
        return {}
    segments = _segments(run)
    start = time.perf_counter()
    d = train_steps(wm.denoiser_trainer, wm.denoiser.compute_loss, segments, p.world_model.batch_size,
                    p.agent.denoiser_steps_per_epoch, p.world_model.denoiser.training_segment_steps, run.device)
    seconds["denoiser"] = _elapsed(start, run.device)
    start = time.perf_counter()
    r_segments, r_steps = _reward_end_segments(run)
    r = train_steps(wm.reward_end_trainer, wm.reward_end.compute_loss, r_segments, p.world_model.batch_size,
                    p.agent.reward_end_steps_per_epoch, r_steps, run.device)
    seconds["reward_end"] = _elapsed(start, run.device)
    return {**{f"denoiser/{k}": v for k, v in d.items()}, **{f"reward_end/{k}": v for k, v in r.items()}}


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start` (time.perf_counter), once the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_epoch(run: AgentRun) -> dict[str, float]:
    """Run epoch `run.epoch` (0-based) and return its metrics row.

    The row's `seconds/<phase>` split the epoch's time into collect, denoiser, reward_end,
    actor_critic and test (the phases an epoch has; benchmarks/gpu_smoke.py projects a run from them).
    """
    cfg = run.params.agent
    start = time.perf_counter()
    row: dict[str, float] = {"epoch": run.epoch}
    seconds: dict[str, float] = {}
    if run.epoch == 0:
        phase = time.perf_counter()
        ac = _train_actor_critic(run, cfg.first_epoch_actor_critic_steps)
        seconds["actor_critic"] = _elapsed(phase, run.device)
    else:
        if run.epoch <= run.collect_epochs:
            budget = cfg.total_env_steps - run.env_steps
            phase = time.perf_counter()
            stats = _collect(run, min(cfg.collect_steps_per_epoch, budget))
            seconds["collect"] = _elapsed(phase, run.device)
            if stats:
                row["collect/episode_return"] = float(np.mean([s.ret for s in stats]))
        row.update(_train_world_model(run, seconds))
        phase = time.perf_counter()
        ac = _train_actor_critic(run, cfg.actor_critic_steps_per_epoch)
        seconds["actor_critic"] = _elapsed(phase, run.device)
    row.update({f"actor_critic/{k}": v for k, v in ac.items()})
    run.epoch += 1
    if run.epoch % cfg.test_every_epochs == 0 or run.done:
        phase = time.perf_counter()
        policy = AgentPolicy(run.actor_critic, 0.0, np.random.default_rng(derived_seed(run.seed, run.epoch, AGENT_TEST_POLICY)), run.device)
        run.actor_critic.eval()
        returns = test_episode_returns(run.game, derived_seed(run.seed, run.epoch, AGENT_TEST_ENV), run.params.env, policy, cfg.test_episodes)
        row["test/return_mean"] = float(np.mean(returns))
        seconds["test"] = _elapsed(phase, run.device)
    row.update({f"seconds/{k}": v for k, v in seconds.items()})
    row.update({"env_steps": run.env_steps, "num_episodes": len(run.store), "epoch_seconds": _elapsed(start, run.device)})
    run.curve.append(row)
    return row


def train(
    run: AgentRun,
    state_dir: Path,
    key: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> AgentRun:
    """Run the remaining epochs, checkpointing into `state_dir`; the final state is saved too."""
    every = run.params.agent.checkpoint_every_epochs
    progress = Progress(f"train-agent {run.game}-{run.seed}", run.total_epochs, "epochs", initial=run.epoch)
    while not run.done:
        row = run_epoch(run)
        progress.update()
        if on_epoch is not None:
            on_epoch(row)
        if run.epoch % every == 0 or run.done:
            save_state(run, state_dir / STATE_FILE, key)
    progress.close()
    return run


# ---------------------------------------------------------------- whole-state checkpoint


def save_state(run: AgentRun, path: Path, key: str) -> None:
    wm = run.world_model
    atomic_save_torch(path, {
        RESUME_KEY: key,
        "epoch": run.epoch,
        "env_steps": run.env_steps,
        "initial_env_steps": run.initial_env_steps,
        "num_episodes": len(run.store),
        "denoiser": wm.denoiser.state_dict(),
        "reward_end": wm.reward_end.state_dict(),
        "denoiser_trainer": wm.denoiser_trainer.state_dict(),
        "reward_end_trainer": wm.reward_end_trainer.state_dict(),
        "actor_critic": run.actor_critic.state_dict(),
        "actor_critic_trainer": run.actor_critic_trainer.state_dict(),
        **rng_state(_generators(run)),
        "curve": run.curve,
        "collection": _collection_state(run),
        "imagination": _imagination_state(run),
    })


def _imagination_state(run: AgentRun) -> dict[str, Any] | None:
    """The imagined rows in progress when they go on across updates (row A8 of
    docs/official-parity.md); None otherwise, as every update then starts afresh."""
    if not run.params.actor_critic.continue_rows_across_updates:
        return None
    return run.imagination.state_dict() if run.imagination is not None else run.imagination_state


def _generators(run: AgentRun) -> dict[str, np.random.Generator]:
    return {"segment_rng": run.segment_rng, "policy_rng": run.policy_rng}


def curve_csv(run: AgentRun) -> bytes:
    """The per-epoch curve as CSV, `epoch` first."""
    return curve_csv_bytes(run.curve, ["epoch"])


def saved_resume_key(state_dir: Path) -> str | None:
    """The resume key of the run saved in `state_dir`, or None when there is none (or it is unreadable)."""
    try:
        return load_torch(state_dir / STATE_FILE).get(RESUME_KEY)
    except ArtifactError:
        return None


def load_state(run: AgentRun, state_dir: Path) -> AgentRun:
    """Restore a freshly built `run` (same params) to the saved state; the dataset is cut back to it."""
    state = load_torch(state_dir / STATE_FILE, map_location=run.device)
    wm = run.world_model
    wm.denoiser.load_state_dict(state["denoiser"])
    wm.reward_end.load_state_dict(state["reward_end"])
    wm.denoiser_trainer.load_state_dict(state["denoiser_trainer"])
    wm.reward_end_trainer.load_state_dict(state["reward_end_trainer"])
    run.actor_critic.load_state_dict(state["actor_critic"])
    run.actor_critic_trainer.load_state_dict(state["actor_critic_trainer"])
    restore_rng_state(state, _generators(run))
    run.epoch, run.env_steps = int(state["epoch"]), int(state["env_steps"])
    run.initial_env_steps = int(state["initial_env_steps"])
    run.curve = list(state["curve"])
    run.store = truncate_store(run.store, int(state["num_episodes"]))
    _restore_collection(run, state["collection"])
    run.imagination_state = state.get("imagination")
    return run


def truncate_store(store: EpisodeStore, num_episodes: int) -> EpisodeStore:
    """The store cut back to its first `num_episodes` episodes (rebuilt aside, then swapped in)."""
    if len(store) == num_episodes:
        return store
    if len(store) < num_episodes:
        raise ArtifactError(f"{store.root}: holds {len(store)} episodes, fewer than the {num_episodes} checkpointed")
    root = store.root
    aside = root.with_name(root.name + ".rebuild")
    shutil.rmtree(aside, ignore_errors=True)
    rebuilt = EpisodeStore(aside, store.game, store.num_actions)
    for i in range(num_episodes):
        rebuilt.append(store[i], in_progress=store.in_progress(i), writes=store.write_history(i))
    old = root.with_name(root.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    root.rename(old)
    aside.rename(root)
    shutil.rmtree(old)
    return EpisodeStore(root)
