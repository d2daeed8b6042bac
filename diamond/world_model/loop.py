"""The first epoch's world-model training (docs/architecture.md §3.5), with whole-state resume.

Trains the denoiser D for `world_model.denoiser_steps` and the reward/termination model R for
`world_model.reward_end_steps`, interleaved (one step of each per iteration until each has its
count), on the `collect` dataset. The stage train-world-model (stages/train_world_model.py)
runs it, then measures imagination fidelity and logs to MLflow through `on_row`.

Resume (the scheme of diamond/resume.py, shared with the agent loop in diamond/agent/loop.py): every
`checkpoint_every_steps` iterations the whole training state (models, AdamW states, step
counters, torch and numpy random states, the loss curve so far and the part of it not yet
logged) is written atomically to `<out>.partial`, a file beside the output that DVC and
Snakemake do not delete. A new run
resumes from that file, or from an existing `<out>`, when its resume key matches (same
world_model config apart from step counts and logging, same game, seed and dataset) and it holds
no more steps than asked; the resumed run continues the same random streams, so it ends with the
same weights as an uninterrupted run. The finished checkpoint replaces the partial one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diamond.config import WorldModelConfig, to_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.data.resave import training_episodes
from diamond.data.sampler import denoiser_placement, reward_end_placement
from diamond.io import ArtifactError
from diamond.models.reward_end import class_counts
from diamond.progress import Progress
from diamond.resume import RESUME_KEY, curve_csv_bytes, restore_rng_state, resume_key, rng_state
from diamond.seeds import WORLD_MODEL_SEGMENTS, stream_rng
from diamond.training import training_step
from diamond.world_model.model import WorldModel, build_world_model, load_world_model, read_checkpoint, save_world_model

CURVE_FIRST_COLUMNS = ("iteration", "denoiser_steps", "reward_end_steps")
Row = dict[str, float]


def world_model_resume_key(c: WorldModelConfig, game: str, seed: int, store: EpisodeStore) -> str:
    """Everything a checkpoint's training depends on except how long it ran and how it logged."""
    invariant = dataclasses.replace(c, denoiser_steps=0, reward_end_steps=0, checkpoint_every_steps=0, log_every_steps=0)
    return resume_key(world_model=to_dict(invariant), game=game, seed=seed, episodes=len(store), steps=store.num_steps)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def find_resume(out: Path, key: str, c: WorldModelConfig) -> tuple[Path, dict[str, Any]] | None:
    """The most advanced matching checkpoint that does not exceed the asked step counts."""
    best = None
    for path in (out, partial_path(out)):
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint(path)
        except ArtifactError as e:
            print(f"ignoring unreadable checkpoint: {e}")
            continue
        d, r = ckpt["denoiser_trainer"]["num_steps"], ckpt["reward_end_trainer"]["num_steps"]
        if ckpt.get(RESUME_KEY) != key or d > c.denoiser_steps or r > c.reward_end_steps:
            continue
        if best is None or d + r > best[1]["denoiser_trainer"]["num_steps"] + best[1]["reward_end_trainer"]["num_steps"]:
            best = (path, ckpt)
    return best


class Curve:
    """Loss curve rows (means over each logging interval); `on_row` sees each row as it comes.
    `pending` is the interval not yet logged (its sums and counts): a checkpoint taken between two
    rows holds it, so that the resumed run's next row is the mean over the same steps."""

    def __init__(self, rows: list[Row], on_row: Callable[[Row], None] | None = None,
                 pending: dict[str, dict[str, float]] | None = None) -> None:
        self.rows = rows
        self.on_row = on_row
        self._sums: dict[str, float] = dict(pending["sums"]) if pending else {}
        self._counts: dict[str, int] = dict(pending["counts"]) if pending else {}

    @property
    def pending(self) -> dict[str, dict[str, float]]:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def add(self, prefix: str, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            key = f"{prefix}_{k}"
            self._sums[key] = self._sums.get(key, 0.0) + v
            self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self, iteration: int, wm: WorldModel) -> None:
        if not self._sums:
            return
        row = {k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}
        row.update(iteration=iteration, denoiser_steps=wm.denoiser_steps, reward_end_steps=wm.reward_end_steps)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        self._sums, self._counts = {}, {}

    def csv_bytes(self) -> bytes:
        return curve_csv_bytes(self.rows, CURVE_FIRST_COLUMNS)


def init_reward_end_priors(wm: WorldModel, store: EpisodeStore) -> None:
    """R's heads start at the dataset's class frequencies (world_model.reward_end_prior_init)."""
    episodes = [store[i] for i in range(len(store))]
    reward, end = class_counts(np.concatenate([ep.rew for ep in episodes]), np.concatenate([ep.terminated for ep in episodes]))
    wm.reward_end.init_heads_to_priors(reward, end)
    print(f"reward_end heads start at the dataset's priors: rewards -/0/+ {reward.tolist()}, terminations no/yes {end.tolist()}")


@dataclass
class WorldModelRun:
    """Everything the loop reads and changes; what `save` writes and `start_or_resume` restores."""

    world_model: WorldModel
    store: EpisodeStore
    segment_rng: np.random.Generator  # segment sampling for D and R
    curve: Curve
    key: str
    out: Path  # the finished checkpoint; `<out>.partial` holds the periodic ones
    device: torch.device
    iteration: int = 0
    resumed_from: Path | None = None
    label: str = ""  # GAME-SEED, for progress lines

    def state(self) -> dict[str, Any]:
        """What the checkpoint holds besides the world model itself."""
        return {RESUME_KEY: self.key, "iteration": self.iteration, **rng_state({"segment_rng": self.segment_rng}),
                "curve": self.curve.rows, "curve_pending": self.curve.pending}

    def save(self, path: Path) -> None:
        save_world_model(path, self.world_model, self.state())


def start_or_resume(
    c: WorldModelConfig, game: str, seed: int, store: EpisodeStore, num_actions: int, obs_size: int,
    out: Path, device: torch.device, on_row: Callable[[Row], None] | None = None,
) -> WorldModelRun:
    """A fresh run (torch seeded with `seed`, R's priors as asked), or the saved one it continues."""
    key = world_model_resume_key(c, game, seed, store)
    torch.manual_seed(seed)
    seg_rng = stream_rng(seed, WORLD_MODEL_SEGMENTS)
    resume = find_resume(out, key, c)
    if resume is None:
        wm = build_world_model(c, num_actions, obs_size, device)
        if c.reward_end_prior_init:
            init_reward_end_priors(wm, store)
        return WorldModelRun(wm, store, seg_rng, Curve([], on_row), key, out, device, label=f"{game}-{seed}")
    path, ckpt = resume
    wm = load_world_model(path, device, c, ckpt)
    restore_rng_state(ckpt, {"segment_rng": seg_rng})
    print(f"resumed from {path}: denoiser step {wm.denoiser_steps}, reward_end step {wm.reward_end_steps}")
    return WorldModelRun(wm, store, seg_rng, Curve(list(ckpt["curve"]), on_row, ckpt.get("curve_pending")), key, out, device,
                         iteration=int(ckpt["iteration"]), resumed_from=path, label=f"{game}-{seed}")


def train(run: WorldModelRun) -> WorldModelRun:
    """Interleave D and R steps until both reach their counts; checkpoint to `<out>.partial`,
    then write `<out>` and remove the partial checkpoint."""
    wm, c, curve, device = run.world_model, run.world_model.cfg, run.curve, run.device
    # D's and R's samplers share one random stream, drawn in the same order as one sampler.
    episodes = training_episodes(run.store, c.training_frames)
    d_segments = SegmentSampler(episodes, run.segment_rng, placement=denoiser_placement(c.denoiser))
    r_placement, r_steps = reward_end_placement(c.reward_end)
    r_segments = SegmentSampler(episodes, run.segment_rng, placement=r_placement)
    wm.denoiser.train()
    wm.reward_end.train()
    # One iteration = one D step and one R step while each has steps left.
    total = run.iteration + max(c.denoiser_steps - wm.denoiser_steps, c.reward_end_steps - wm.reward_end_steps, 0)
    progress = Progress(f"train-world-model {run.label}", total, "steps", initial=run.iteration)
    while wm.denoiser_steps < c.denoiser_steps or wm.reward_end_steps < c.reward_end_steps:
        if wm.denoiser_steps < c.denoiser_steps:
            seg = d_segments.sample(c.batch_size, c.denoiser.training_segment_steps).to_torch(device)
            curve.add("denoiser", training_step(wm.denoiser_trainer, wm.denoiser.compute_loss, seg))
        if wm.reward_end_steps < c.reward_end_steps:
            seg = r_segments.sample(c.batch_size, r_steps).to_torch(device)
            curve.add("reward_end", training_step(wm.reward_end_trainer, wm.reward_end.compute_loss, seg))
        run.iteration += 1
        progress.update()
        if run.iteration % c.log_every_steps == 0:
            curve.flush(run.iteration, wm)
        if run.iteration % c.checkpoint_every_steps == 0:
            run.save(partial_path(run.out))
    progress.close()
    curve.flush(run.iteration, wm)
    run.save(run.out)
    partial_path(run.out).unlink(missing_ok=True)
    return run
