"""Stage train-world-model: the first epoch's world-model training (docs/architecture.md §3.5) for one game/seed.

Runs diamond/world_model/loop.py (D for `world_model.denoiser_steps`, R for
`world_model.reward_end_steps`, interleaved) on the `collect` dataset, logging its curve to
MLflow, then measures imagination fidelity on held-out real episodes.

    python -m stages.train_world_model --params params.yaml --game Breakout --seed 0 \
        --dataset runs/Breakout-0/dataset_initial --out-checkpoint runs/Breakout-0/world_model.pt \
        --out-metrics runs/Breakout-0/world_model.json --out-curve runs/Breakout-0/world_model_curve.csv \
        --out-media runs/Breakout-0/world_model_media

Resume: diamond/world_model/loop.py checkpoints to `<out-checkpoint>.partial` and a rerun with
the same config, game, seed and dataset continues from it, ending with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from diamond.config import Params
from diamond.data import EpisodeStore
from diamond.io import ArtifactError, atomic_write_bytes, atomic_write_json
from diamond.seeds import WORLD_MODEL_FIDELITY, derived_seed
from diamond.training import apply_speed_switches
from diamond.world_model.fidelity import heldout_episodes, measure_fidelity, summary_metrics
from diamond.world_model.loop import start_or_resume, train
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.compute import compute_setup
from stages.tracking import stage_run

GIF_NAME = "imagination.gif"


def run(args: Any, p: Params) -> None:
    c, game, seed = p.world_model, args.game, args.seed
    forget_provenance(args.out_checkpoint.parent, "train-world-model")
    device, memory_tags = compute_setup(p)
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

    def log_row(row: dict[str, float]) -> None:
        tracking.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=int(row["iteration"]))

    run = start_or_resume(c, game, seed, store, store.num_actions, p.env.obs_size, args.out_checkpoint, device, log_row)
    wm, curve = run.world_model, run.curve
    apply_speed_switches(p, (wm.denoiser, wm.reward_end), wm.denoiser.net)

    with stage_run("train-world-model", sections=stage_sections(p, "train-world-model"), game=game, seed=seed,
                   inputs=[args.dataset], job_dir=args.out_checkpoint.parent):
        tracking.set_tags(memory_tags)
        tracking.log_params({"resumed_from_denoiser_step": wm.denoiser_steps, "resumed_from_reward_end_step": wm.reward_end_steps})
        for name, n in wm.num_parameters().items():
            tracking.log_param(f"num_parameters_{name}", n)
        for row in curve.rows:  # the resumed run's history, so the MLflow curve is whole
            log_row(row)
        start = time.perf_counter()
        train(run)
        seconds = time.perf_counter() - start

        episodes = heldout_episodes(game, seed, p.env, p.evaluate.fidelity_episodes)
        args.out_media.mkdir(parents=True, exist_ok=True)
        fidelity = measure_fidelity(
            wm.sampler, wm.reward_end, episodes, c.denoiser.num_conditioning_frames, p.evaluate.fidelity_horizons,
            c.reward_end.segment_length, p.evaluate.gif_frames, args.out_media / GIF_NAME, device,
            derived_seed(seed, WORLD_MODEL_FIDELITY),
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
