"""Train the denoiser D alone on an episode store, then measure its open-loop fidelity.

What the learning benchmark's train-world-model does for D (the config's architecture, optimiser,
batch and recency weights), without R, from one training draw (`--train-seed`: D's
initialisation, noise and segments), so that several draws of one setting can be compared on one
dataset. Fidelity: open-loop rollouts of horizons 1-15 with the real actions on `--heldout`
fresh uniform-policy episodes of the store's game (diamond.world_model.fidelity.heldout_episodes from
`--seed`), `--rollouts` per episode; per-step MSE and its ratio to repeating the last frame.
Used for issue 17's seed-2 diagnosis (docs/results.md, "Learning benchmark"):

    OMP_NUM_THREADS=1 python -m benchmarks.denoiser_draws --params configs/small_learning.yaml \\
        --dataset runs/benchmark/Assault-2/dataset_initial --seed 2 --train-seed 0 \\
        --autoregressive-steps 1 --json /tmp/ar1-0.json
    python -m benchmarks.denoiser_draws --params configs/small_learning.yaml --dataset DIR --seed 2 \
        --checkpoint runs/benchmark/Assault-2/world_model.pt      # a trained world model's D, same measure
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from diamond.config import load_params
from diamond.data import EpisodeStore
from diamond.data.sampler import RECENCY_WEIGHTS
from diamond.training import apply_speed_switches
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.fidelity import heldout_episodes
from diamond.world_model.model import load_world_model, make_sampler
from diamond.world_model.study import open_loop_errors, train_denoiser

HORIZON = 15
ROLLOUT_SEED = 7  # the sampler's noise in the rollouts, the same for every draw


def train(p, store: EpisodeStore, autoregressive_steps: int, steps: int, train_seed: int) -> tuple[Denoiser, float]:
    """study.train_denoiser with the config's D, `autoregressive_steps`, and the recency weights of
    train-world-model; returns D and its mean loss over the last 200 steps."""
    cfg = dataclasses.replace(p.world_model, denoiser=dataclasses.replace(
        p.world_model.denoiser, num_autoregressive_steps=autoregressive_steps))
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["loss"])
        if step % 500 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.4f}", flush=True)

    denoiser = train_denoiser(cfg, store, store.num_actions, steps, train_seed, torch.device("cpu"),
                              lambda net: apply_speed_switches(p, (net,), net.net), on_step, weights=RECENCY_WEIGHTS)
    return denoiser, float(np.mean(losses[-200:]))


def fidelity(p, denoiser: Denoiser, game: str, seed: int, heldout: int, rollouts: int) -> dict:
    episodes = heldout_episodes(game, seed, p.env, heldout)
    cfg = dataclasses.replace(p.world_model, denoiser=denoiser.cfg)
    with torch.no_grad():
        err = open_loop_errors(make_sampler(denoiser, cfg), episodes, cfg.denoiser.num_conditioning_frames,
                               list(range(1, HORIZON + 1)), rollouts, torch.device("cpu"), ROLLOUT_SEED)
    valid = err["valid"]
    model = (err["model_mse"] * valid).sum(0) / valid.sum(0)
    repeat = (err["repeat_last_mse"] * valid).sum(0) / valid.sum(0)
    return {"num_rollouts": int(len(valid)), "mse": model.tolist(), "mse_repeat_last": repeat.tolist(),
            "ratio_h1": float(model[0] / repeat[0]), f"ratio_h{HORIZON}": float(model[-1] / repeat[-1]),
            "ratio_mean": float(model.mean() / repeat.mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True, help="an episode store (e.g. a run's dataset_initial)")
    ap.add_argument("--seed", type=int, default=0, help="the run seed: which held-out episodes")
    ap.add_argument("--train-seed", type=int, default=0, help="D's training draw")
    ap.add_argument("--autoregressive-steps", type=int, default=None, help="default: the params file's")
    ap.add_argument("--steps", type=int, default=None, help="D steps (default: world_model.denoiser_steps)")
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per held-out episode")
    ap.add_argument("--checkpoint", type=Path, help="measure this world_model.pt's D instead of training one")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    p = load_params(args.params)
    store = EpisodeStore(args.dataset)
    if args.checkpoint is not None:
        wm = load_world_model(args.checkpoint, torch.device("cpu"))
        out = {"checkpoint": str(args.checkpoint), "seed": args.seed,
               **fidelity(p, wm.denoiser.eval(), store.game, args.seed, args.heldout, args.rollouts)}
    else:
        k = p.world_model.denoiser.num_autoregressive_steps if args.autoregressive_steps is None else args.autoregressive_steps
        steps = p.world_model.denoiser_steps if args.steps is None else args.steps
        start = time.perf_counter()
        denoiser, final_loss = train(p, store, k, steps, args.train_seed)
        out = {"params": str(args.params), "dataset": str(args.dataset), "seed": args.seed, "train_seed": args.train_seed,
               "autoregressive_steps": k, "denoiser_steps": steps, "train_seconds": time.perf_counter() - start,
               "final_loss": final_loss, **fidelity(p, denoiser, store.game, args.seed, args.heldout, args.rollouts)}
    print(json.dumps({key: v for key, v in out.items() if not isinstance(v, list)}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
