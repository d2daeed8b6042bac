"""Stage study: one variant and seed of the world-model study (paper section 5.1, diamond/world_model/study.py).

Trains the denoiser D of the variant (formulation, sampling steps) for `study.denoiser_steps` on
the static episode store `study.dataset`, its last `study.heldout_episodes` finished episodes held
out, then rolls it out open loop on them and writes per-step MSE/PSNR/SSIM beside the
repeat-last-frame baseline. The variant comes on the command line (dvc.yaml and the Snakefile
take it from `study.variants`), so adding a variant reruns no other.

    python -m stages.study --params params.yaml --game Breakout --seed 0 \
        --variant edm-3 --formulation edm --num-steps 3 --out-dir study/Breakout/edm-3-0
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from diamond.config import Params, StudyVariant, to_dict
from diamond.data import EpisodeStore
from diamond.io import ArtifactError, atomic_save_torch, atomic_write_bytes, atomic_write_json
from diamond.results.study_errors import errors_npz, horizon_summary
from diamond.seeds import STUDY_ROLLOUTS, derived_seed
from diamond.training import apply_speed_switches
from diamond.world_model.model import make_sampler
from diamond.world_model.study import EpisodeSubset, heldout_split, open_loop_errors, train_denoiser, variant_config
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.compute import compute_setup
from stages.tracking import stage_run

LOG_POINTS = 50  # loss points logged to MLflow per training run
ERRORS_FILE, METRICS_FILE, CHECKPOINT_FILE = "errors.npz", "metrics.json", "denoiser.pt"


def open_dataset(path: Path, game: str, obs_size: int | None = None) -> EpisodeStore:
    """The static episode store, checked: it exists, holds `game` and has episodes."""
    if not path.is_dir():
        raise ArtifactError(f"study.dataset: {path}: episode store not found (build it first, e.g. train-agent's runs/G-S/dataset)")
    store = EpisodeStore(path)
    if store.game != game:
        raise ArtifactError(f"study.dataset: {path} holds episodes of {store.game!r}, not of study game {game!r}")
    if len(store) == 0:
        raise ArtifactError(f"study.dataset: {path} holds no episodes")
    return store


def run(args: Any, p: Params) -> None:
    s, game, seed = p.study, args.game, args.seed
    variant = StudyVariant(args.variant, args.formulation, args.num_steps)
    cfg = variant_config(p.world_model, variant)  # one-line error for a bad variant
    forget_provenance(args.out_dir, "study")
    device, memory_tags = compute_setup(p)
    dataset = Path(s.dataset)
    store = open_dataset(dataset, game)
    context = cfg.denoiser.num_conditioning_frames
    train_idx, heldout_idx = heldout_split(store, s.heldout_episodes, context)
    torch.use_deterministic_algorithms(True, warn_only=True)

    def prepare(net: torch.nn.Module) -> None:
        apply_speed_switches(p, (net,), net.net)

    log_every = max(1, s.denoiser_steps // LOG_POINTS)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % log_every == 0 or step == s.denoiser_steps:
            tracking.log_metrics({f"denoiser_{k}": v for k, v in metrics.items()}, step=step)

    with stage_run("study", sections=stage_sections(p, "study"), game=game, seed=seed, inputs=[dataset], job_dir=args.out_dir):
        # runs of one variant group together in the UI (Group by > tags > study_variant)
        tracking.set_tags({"study_variant": variant.name, "study_formulation": variant.formulation,
                         "study_num_steps": str(variant.num_steps), "mlflow.runName": f"study/{game}-{variant.name}-{seed}", **memory_tags})
        start = time.perf_counter()
        denoiser = train_denoiser(cfg, EpisodeSubset(store, train_idx), store.num_actions, s.denoiser_steps, seed,
                                  device, prepare, on_step)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        errors = open_loop_errors(
            make_sampler(denoiser, cfg), [store[i] for i in heldout_idx], context, s.horizons, s.rollouts_per_episode,
            device, derived_seed(seed, STUDY_ROLLOUTS),
        )
        rollout_seconds = time.perf_counter() - start
        args.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_torch(args.out_dir / CHECKPOINT_FILE, {"config": to_dict(cfg), "variant": to_dict(variant),
                                                           "num_actions": store.num_actions, "denoiser": denoiser.state_dict()})
        atomic_write_bytes(args.out_dir / ERRORS_FILE, errors_npz(errors))
        summary = horizon_summary(errors, s.horizons)
        metrics = {
            "game": game, "seed": seed, "variant": to_dict(variant), "dataset": str(dataset),
            "train_episodes": len(train_idx), "heldout_episodes": heldout_idx, "rollouts": int(len(errors["valid"])),
            "longest_rollout": int(errors["valid"].sum(1).max()), "denoiser_steps": s.denoiser_steps,
            "train_seconds": train_seconds, "rollout_seconds": rollout_seconds, "horizons": summary,
        }
        atomic_write_json(args.out_dir / METRICS_FILE, metrics)
        tracking.log_metrics({"train_seconds": train_seconds, "rollout_seconds": rollout_seconds})
        tracking.log_metrics({f"h{h}/{k}": v for h, row in summary.items() for k, v in row.items() if v is not None})
        tracking.log_artifact(str(args.out_dir / METRICS_FILE))
        first = summary[str(s.horizons[0])]
        print(f"study {game} {variant.name} seed {seed}: D {s.denoiser_steps} steps in {train_seconds:.0f} s, rollouts "
              f"{rollout_seconds:.0f} s; h={s.horizons[0]} MSE {first['model_mse']} vs repeat-last {first['repeat_last_mse']}")


def main() -> None:
    parser = base_parser("One variant and seed of the world-model study (paper section 5.1).")
    parser.add_argument("--variant", required=True, help="variant name (study.variants[].name)")
    parser.add_argument("--formulation", required=True, help="edm or ddpm")
    parser.add_argument("--num-steps", required=True, type=int, help="denoising steps per frame")
    parser.add_argument("--out-dir", required=True, type=Path, help="directory of this job's outputs")
    args = parser.parse_args()
    run(args, load_checked_params(args))


if __name__ == "__main__":
    run_main(main)
