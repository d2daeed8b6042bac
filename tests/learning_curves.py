"""Learning curves behind the thresholds of tests/test_world_model_learning.py (not collected by
pytest): the same data, networks and metrics as the tests, evaluated every `--every` steps, for
several initialisations, with the seconds spent training. Run from the repository root, e.g.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python tests/learning_curves.py denoiser --inits 0 1 2
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python tests/learning_curves.py reward --variant test --inits 0 1 2 3 --steps 600 --every 50

`--variant` picks a network size (VARIANTS below; "test" is what the test trains), `--lr` the
learning rate, `--batch` the segments per update, `--game` another game. Curves measured with it:
docs/results.md, the sections "The learning tests' curves ...".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import test_world_model_learning as t  # noqa: E402
from diamond.config import Params  # noqa: E402
from diamond.data import SegmentSampler  # noqa: E402
from diamond.training import training_step  # noqa: E402
from diamond.world_model.fidelity import open_loop_metrics, reward_end_metrics  # noqa: E402

# Network sizes tried, as replacements of the test's denoiser / reward_end sections ("test": its own).
VARIANTS: dict[str, dict] = {
    "test": {},
    "d2x32": dict(channels=[32, 32], depths=[1, 1], attention=[False] * 2, num_groups_channels=32),
    "d2x16": dict(channels=[16, 16], depths=[1, 1], attention=[False] * 2, num_groups_channels=16),
    "d3x16": dict(channels=[16, 16, 16], depths=[1, 1, 1], attention=[False] * 3, num_groups_channels=16),
    "r3x16": dict(channels=[16, 16, 16], depths=[1, 1, 1], cond_channels=32, num_groups_channels=16, lstm_dim=64),
    "r4x8": dict(channels=[8, 8, 8, 8], depths=[1, 1, 1, 1], cond_channels=32, num_groups_channels=8, lstm_dim=32),
}


def with_variant(p: Params, model: str, variant: str, lr: float | None) -> Params:
    wm = p.world_model
    section = "denoiser" if model == "denoiser" else "reward_end"
    cfg = dataclasses.replace(getattr(wm, section), **VARIANTS[variant])
    wm = dataclasses.replace(wm, **{section: cfg})
    if lr is not None:
        opt = f"{section}_optimizer"
        wm = dataclasses.replace(wm, **{opt: dataclasses.replace(getattr(wm, opt), lr=lr)})
    return dataclasses.replace(p, world_model=wm)


def curve(model: str, p: Params, store, held, init: int, steps: int, every: int, batch: int) -> None:
    wm = t.fresh_world_model(p, store, seed=init)
    segments = SegmentSampler(store, np.random.default_rng(init))
    L, T = p.world_model.denoiser.num_conditioning_frames, p.world_model.reward_end.segment_length
    if model == "denoiser":
        trainer, loss_fn = wm.denoiser_trainer, wm.denoiser.compute_loss
        segment_steps = p.world_model.denoiser.training_segment_steps
    else:
        trainer, loss_fn, segment_steps = wm.reward_end_trainer, wm.reward_end.compute_loss, T
    trained = 0.0

    def report(step: int) -> None:
        if model == "denoiser":
            wm.denoiser.eval()
            m = open_loop_metrics(wm.sampler, held, L, [1], torch.device("cpu"), torch.Generator().manual_seed(0))
            wm.denoiser.train()
            h = m["horizons"]["1"]
            figure = f"mse {h['mse']:.6f} repeat-last {h['mse_repeat_last']:.6f} ratio {h['mse'] / h['mse_repeat_last']:.3f}"
        else:
            rep = reward_end_metrics(wm.reward_end, held, T, torch.device("cpu"))
            wm.reward_end.train()
            rew, end = rep["reward"], rep["termination"]
            figure = (f"reward: sampled recall {rew['sampled_recall']['positive']:.3f} false rate "
                      f"{rew['sampled_false_rate']['positive']:.4f} log loss/constant "
                      f"{rew['log_loss'] / rew['log_loss_constant']:.3f} recall {rew['recall']['positive']:.3f} "
                      f"zero {rew['recall']['zero']:.3f} (support {rew['support']['positive']}); "
                      f"end: sampled recall {end['sampled_recall']['end']:.3f} recall {end['recall']['end']}")
        print(f"init {init} step {step:5d} train {trained:7.1f} s  {figure}", flush=True)

    report(0)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        training_step(trainer, loss_fn, segments.sample(batch, segment_steps).to_torch("cpu"))
        trained += time.perf_counter() - start
        if step % every == 0:
            report(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["denoiser", "reward"])
    ap.add_argument("--variant", default="test", choices=sorted(VARIANTS))
    ap.add_argument("--lr", type=float, default=None, help="the optimiser's learning rate (default: the test's)")
    ap.add_argument("--inits", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=t.BATCH, help="segments per update (default: the test's)")
    ap.add_argument("--game", default=None, help="the game to learn (default: the test's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = with_variant(t.learning_params(), args.model, args.variant, args.lr)
    game, heldout = (t.GAME, 2) if args.model == "denoiser" else (t.REWARD_GAME, 12)
    game = args.game or game
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store, held = t.random_play(game, Path(tmp), p, heldout)
        print(f"{game}: {t.COLLECT_STEPS} random steps and {heldout} held-out episodes in "
              f"{time.perf_counter() - start:.1f} s; variant {args.variant}, lr {args.lr or 'test'}, batch {args.batch}", flush=True)
        for init in args.inits:
            curve(args.model, p, store, held, init, args.steps, args.every, args.batch)


if __name__ == "__main__":
    main()
