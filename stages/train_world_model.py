"""Stage train-world-model: the first epoch's world-model training (docs/architecture.md §3.5) for one game/seed.

Trains the denoiser D for `world_model.denoiser_steps` and the reward/termination model R for
`world_model.reward_end_steps` (interleaved: one step of each per iteration until each has its
count) on the `collect` dataset, then measures imagination fidelity on held-out real episodes.

    python -m stages.train_world_model --params params.yaml --game Breakout --seed 0 \
        --dataset runs/Breakout-0/dataset_initial --out-checkpoint runs/Breakout-0/world_model.pt \
        --out-metrics runs/Breakout-0/world_model.json --out-curve runs/Breakout-0/world_model_curve.csv \
        --out-media runs/Breakout-0/world_model_media

Resume: every `checkpoint_every_steps` iterations the whole training state (models, AdamW states,
step counters, torch and numpy random states, the loss curve so far) is written atomically to
`<out-checkpoint>.partial`, a file beside the output that DVC and Snakemake do not delete. A new
run resumes from that file, or from an existing `--out-checkpoint`, when its resume key matches
(same world_model config apart from step counts and logging, same game, seed and dataset) and it
holds no more steps than asked; the resumed run continues the same random streams, so it ends
with the same weights as an uninterrupted run. The finished checkpoint replaces the partial one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diamond.allocator import reuse_freed_memory
from diamond.config import ConfigError, Params, WorldModelConfig, params_hash
from diamond.data import EpisodeStore, SegmentSampler
from diamond.fidelity import heldout_episodes, measure_fidelity, summary_metrics
from diamond.io import ArtifactError, atomic_write_bytes, atomic_write_json
from diamond.models.reward_end import class_counts
from diamond.training import compile_networks, set_memory_format, set_tf32
from diamond.world_model import WorldModel, build_world_model, load_world_model, read_checkpoint, save_world_model
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, resolve_device, run_main
from stages.tracking import stage_run

SEGMENT_STREAM = 2  # stream of the run seed that drives segment sampling
FIDELITY_STREAM = 3  # stream of the run seed for the fidelity sampler's noise
GIF_NAME = "imagination.gif"


def check_config(c: WorldModelConfig) -> None:
    for name in ("batch_size", "checkpoint_every_steps", "log_every_steps"):
        if getattr(c, name) < 1:
            raise ConfigError(f"world_model.{name}: {getattr(c, name)} must be >= 1")
    for name in ("denoiser_steps", "reward_end_steps"):
        if getattr(c, name) < 0:
            raise ConfigError(f"world_model.{name}: {getattr(c, name)} must be >= 0")
    if c.reward_end.segment_length < 1:
        raise ConfigError(f"world_model.reward_end.segment_length: {c.reward_end.segment_length} must be >= 1")


def resume_key(c: WorldModelConfig, game: str, seed: int, store: EpisodeStore) -> str:
    """Everything a checkpoint's training depends on except how long it ran and how it logged."""
    invariant = dataclasses.replace(c, denoiser_steps=0, reward_end_steps=0, checkpoint_every_steps=0, log_every_steps=0)
    return f"{params_hash(invariant)}:{game}:{seed}:{len(store)}:{store.num_steps}"


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
        if ckpt.get("resume_key") != key or d > c.denoiser_steps or r > c.reward_end_steps:
            continue
        if best is None or d + r > best[1]["denoiser_trainer"]["num_steps"] + best[1]["reward_end_trainer"]["num_steps"]:
            best = (path, ckpt)
    return best


class Curve:
    """Loss curve rows (means over each logging interval), logged to MLflow as they come."""

    def __init__(self, rows: list[dict[str, float]]) -> None:
        self.rows = rows
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

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
        tracking.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
        self._sums, self._counts = {}, {}

    def csv_bytes(self) -> bytes:
        columns = ["iteration", "denoiser_steps", "reward_end_steps"]
        columns += sorted({k for row in self.rows for k in row} - set(columns))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buf.getvalue().encode()


def init_reward_end_priors(wm: WorldModel, store: EpisodeStore) -> None:
    """R's heads start at the dataset's class frequencies (world_model.reward_end_prior_init)."""
    episodes = [store[i] for i in range(len(store))]
    reward, end = class_counts(np.concatenate([ep.rew for ep in episodes]), np.concatenate([ep.terminated for ep in episodes]))
    wm.reward_end.init_heads_to_priors(reward, end)
    print(f"reward_end heads start at the dataset's priors: rewards -/0/+ {reward.tolist()}, terminations no/yes {end.tolist()}")


def training_state(key: str, seg_rng: np.random.Generator, curve: Curve, iteration: int) -> dict[str, Any]:
    return {
        "resume_key": key,
        "iteration": iteration,
        "segment_rng": seg_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "curve": curve.rows,
    }


def train(
    wm: WorldModel, store: EpisodeStore, seg_rng: np.random.Generator, curve: Curve, iteration: int,
    key: str, out: Path, device: torch.device,
) -> int:
    """Interleave D and R steps until both reach their counts; checkpoint to `<out>.partial`."""
    c = wm.cfg
    segments = SegmentSampler(store, seg_rng)
    wm.denoiser.train()
    wm.reward_end.train()
    while wm.denoiser_steps < c.denoiser_steps or wm.reward_end_steps < c.reward_end_steps:
        if wm.denoiser_steps < c.denoiser_steps:
            seg = segments.sample(c.batch_size, c.denoiser.training_segment_steps).to_torch(device)
            loss, metrics = wm.denoiser.compute_loss(seg)
            curve.add("denoiser", {**metrics, **wm.denoiser_trainer.step(loss)})
        if wm.reward_end_steps < c.reward_end_steps:
            seg = segments.sample(c.batch_size, c.reward_end.segment_length).to_torch(device)
            loss, metrics = wm.reward_end.compute_loss(seg)
            curve.add("reward_end", {**metrics, **wm.reward_end_trainer.step(loss)})
        iteration += 1
        if iteration % c.log_every_steps == 0:
            curve.flush(iteration, wm)
        if iteration % c.checkpoint_every_steps == 0:
            save_world_model(partial_path(out), wm, training_state(key, seg_rng, curve, iteration))
    curve.flush(iteration, wm)
    return iteration


def run(args: Any, p: Params) -> None:
    c, game, seed = p.world_model, args.game, args.seed
    check_config(c)
    forget_provenance(args.out_checkpoint.parent, "train-world-model")
    device = resolve_device(p)
    allocator_reuse = reuse_freed_memory(p.reuse_freed_memory)
    if not args.dataset.is_dir():
        raise ArtifactError(f"{args.dataset}: dataset not found (run the collect stage first)")
    store = EpisodeStore(args.dataset)
    if store.game != game:
        raise ArtifactError(f"{args.dataset}: dataset of game {store.game!r}, not --game {game!r}")
    if len(store) == 0:
        raise ArtifactError(f"{args.dataset}: the dataset holds no episodes")
    frame_size = store[0].obs.shape[-1]
    if frame_size != p.env.obs_size:
        raise ArtifactError(
            f"{args.dataset}: frames of {frame_size}x{frame_size}, not env.obs_size={p.env.obs_size}; "
            "collect again with these params"
        )
    torch.use_deterministic_algorithms(True, warn_only=True)

    key = resume_key(c, game, seed, store)
    torch.manual_seed(seed)
    seg_rng = np.random.default_rng([seed, SEGMENT_STREAM])
    curve, iteration = Curve([]), 0
    resume = find_resume(args.out_checkpoint, key, c)
    if resume is None:
        wm = build_world_model(c, store.num_actions, p.env.obs_size, device)
        if c.reward_end_prior_init:
            init_reward_end_priors(wm, store)
    else:
        path, ckpt = resume
        wm = load_world_model(path, device, c, ckpt)
        seg_rng.bit_generator.state = ckpt["segment_rng"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        curve, iteration = Curve(list(ckpt["curve"])), int(ckpt["iteration"])
        print(f"resumed from {path}: denoiser step {wm.denoiser_steps}, reward_end step {wm.reward_end_steps}")
    set_tf32(p.tf32)
    set_memory_format(p.channels_last, wm.denoiser, wm.reward_end)
    compile_networks(p.compile_denoiser, wm.denoiser.net)

    # Only the evaluate keys this stage reads (the fidelity measurement), as in dvc.yaml's params.
    fidelity = {k: getattr(p.evaluate, k) for k in ("fidelity_episodes", "fidelity_horizons", "gif_frames")}
    sections = {"world_model": c, "env": p.env, "evaluate": fidelity, "channels_last": p.channels_last,
                "compile_denoiser": p.compile_denoiser, "reuse_freed_memory": p.reuse_freed_memory, "tf32": p.tf32}
    with stage_run("train-world-model", sections=sections, game=game, seed=seed, inputs=[args.dataset], job_dir=args.out_checkpoint.parent):
        tracking.set_tag("reuse_freed_memory_in_force", allocator_reuse)
        tracking.log_params({"resumed_from_denoiser_step": wm.denoiser_steps, "resumed_from_reward_end_step": wm.reward_end_steps})
        for name, n in wm.num_parameters().items():
            tracking.log_param(f"num_parameters_{name}", n)
        for row in curve.rows:  # the resumed run's history, so the MLflow curve is whole
            tracking.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=int(row["iteration"]))
        start = time.perf_counter()
        iteration = train(wm, store, seg_rng, curve, iteration, key, args.out_checkpoint, device)
        seconds = time.perf_counter() - start
        save_world_model(args.out_checkpoint, wm, training_state(key, seg_rng, curve, iteration))
        partial_path(args.out_checkpoint).unlink(missing_ok=True)

        episodes = heldout_episodes(game, seed, p.env, p.evaluate.fidelity_episodes)
        args.out_media.mkdir(parents=True, exist_ok=True)
        fidelity = measure_fidelity(
            wm.sampler, wm.reward_end, episodes, c.denoiser.num_conditioning_frames, p.evaluate.fidelity_horizons,
            c.reward_end.segment_length, p.evaluate.gif_frames, args.out_media / GIF_NAME, device,
            int(np.random.SeedSequence([seed, FIDELITY_STREAM]).generate_state(1)[0]),
        )
        last = curve.rows[-1] if curve.rows else {}
        metrics = {
            "game": game,
            "seed": seed,
            "denoiser_steps": wm.denoiser_steps,
            "reward_end_steps": wm.reward_end_steps,
            "num_parameters": wm.num_parameters(),
            "train_seconds_this_run": seconds,
            "final": {k: v for k, v in last.items() if k.endswith("loss") or "acc" in k},
            "fidelity": fidelity,
        }
        atomic_write_json(args.out_metrics, metrics)
        atomic_write_bytes(args.out_curve, curve.csv_bytes())
        tracking.log_metrics(summary_metrics(fidelity))
        for path in (args.out_metrics, args.out_curve, args.out_media / GIF_NAME, args.out_checkpoint):
            if path.is_file():
                tracking.log_artifact(str(path))
        h = fidelity["open_loop"]["horizons"]
        first = h[str(min(p.evaluate.fidelity_horizons))]
        print(
            f"train-world-model {game}-{seed}: D {wm.denoiser_steps} steps, R {wm.reward_end_steps} steps; "
            f"h={min(p.evaluate.fidelity_horizons)} MSE {first['mse']:.5f} vs repeat-last {first['mse_repeat_last']:.5f}"
            f" -> {args.out_checkpoint}"
        )


def main() -> None:
    parser = base_parser(
        "Train the diffusion world model and reward/termination model (docs/architecture.md §3.2, §3.3, §3.5)."
    )
    parser.add_argument("--dataset", required=True, type=Path, help="episode store from the collect stage")
    parser.add_argument("--out-checkpoint", required=True, type=Path)
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-curve", required=True, type=Path)
    parser.add_argument("--out-media", required=True, type=Path)
    args = parser.parse_args()
    run(args, load_checked_params(args))


if __name__ == "__main__":
    run_main(main)
