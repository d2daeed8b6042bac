"""fp32 against bf16 autocast for the actor-critic's training in imagination (issue 20, point 2).

    python -m benchmarks.bf16_actor_critic --params P --steps 200 [--device cpu|cuda] [--json PATH]

Three runs of `--steps` actor-critic steps as train-agent takes them (diamond.agent.policy.imagination_loss
over an ImaginationEnv, then the actor-critic's Trainer step): fp32 with seed 0, bf16 autocast
(denoiser, R and actor-critic forward; the optimiser step in fp32) with seed 0, and fp32 with
seed 1 for the run-to-run noise. The world model is P's denoiser and R at their random init (not
trained: the comparison is about the actor-critic's arithmetic; R's termination biased to "no" as in
benchmarks.bench, so that rows end at the horizon), the same in all three runs, as is the actor-
critic's init; the seed sets the imagination's random numbers (sampler noise, actions, R's draws)
and the real starts, drawn from a small synthetic episode store (benchmarks.bench.synthetic_store).

Printed per metric (lambda-return mean, imagined reward mean, actor loss, value loss): the mean
over the last `--tail` steps of each run, bf16 - fp32 (same seed) and fp32 seed 1 - fp32 seed 0;
bf16 is "within noise" of fp32 on a metric when |bf16 - fp32| <= |seed 1 - seed 0| + 2 standard
errors of the difference.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import BENCH_NUM_ACTIONS, rarely_terminating, synthetic_store
from diamond.agent.imagination import ImaginationEnv
from diamond.agent.policy import imagination_loss
from diamond.config import Params, load_params
from diamond.data import SegmentSampler
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer, set_memory_format
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.model import make_sampler

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("lambda_return_mean", "imagined_reward_mean", "loss_actor", "loss_value")


def train(p: Params, device: torch.device, steps: int, seed: int, bf16: bool, store_root: Path) -> dict[str, list[float]]:
    """One run: the same initial models for every run, `seed` for everything random after."""
    size = p.env.obs_size
    torch.manual_seed(0)
    den = Denoiser(p.world_model.denoiser, BENCH_NUM_ACTIONS).to(device).eval()
    reward_end = RewardEndModel(p.world_model.reward_end, BENCH_NUM_ACTIONS, size, output_bias=True).to(device).eval()
    rarely_terminating(reward_end)
    ac = ActorCritic(p.actor_critic, BENCH_NUM_ACTIONS, size).to(device).train()
    set_memory_format(p.channels_last, den, reward_end, ac)
    trainer = Trainer(ac, p.actor_critic.optimizer)
    segments = SegmentSampler(synthetic_store(store_root, size), np.random.default_rng(seed))
    env = ImaginationEnv(make_sampler(den, p.world_model), reward_end, segments,
                         p.world_model.denoiser.num_conditioning_frames, p.actor_critic.batch_size,
                         p.actor_critic.horizon, device)
    torch.manual_seed(1000 + seed)
    curves: dict[str, list[float]] = {m: [] for m in METRICS}
    cast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with cast:
            loss, metrics = imagination_loss(ac, env, p.actor_critic)
        trainer.step(loss.float())
        for m in METRICS:
            curves[m].append(float(metrics[m]))
    curves["seconds"] = [time.perf_counter() - start]
    return curves


def summarise(runs: dict[str, dict[str, list[float]]], tail: int) -> dict:
    out: dict = {}
    for m in METRICS:
        means, sems = {}, {}
        for name, curves in runs.items():
            last = np.asarray(curves[m][-tail:], dtype=np.float64)
            means[name], sems[name] = last.mean(), (last.std(ddof=1) / math.sqrt(len(last)) if len(last) > 1 else 0.0)
            out[f"{m}_{name}"] = means[name]
        diff = means["bf16_seed0"] - means["fp32_seed0"]
        noise = means["fp32_seed1"] - means["fp32_seed0"]
        out[f"{m}_bf16_minus_fp32"] = diff
        out[f"{m}_fp32_seed1_minus_seed0"] = noise
        out[f"{m}_bf16_within_noise"] = bool(
            abs(diff) <= abs(noise) + 2 * math.hypot(sems["bf16_seed0"], sems["fp32_seed0"]))
    for name, curves in runs.items():
        out[f"seconds_{name}"] = curves["seconds"][0]
    return out


def run(args: argparse.Namespace) -> dict:
    p = load_params(args.params)
    device = torch.device(args.device)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed, bf16 in (("fp32_seed0", 0, False), ("bf16_seed0", 0, True), ("fp32_seed1", 1, False)):
            runs[name] = train(p, device, args.steps, seed, bf16, Path(tmp) / name)
            print(f"{name}: {runs[name]['seconds'][0]:.1f} s", flush=True)
    tail = max(1, min(args.tail, args.steps))
    return {"params": str(args.params), "device": args.device, "steps": args.steps, "tail": tail,
            "world_model": "random init (untrained), termination biased to 'no'", **summarise(runs, tail)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tail", type=int, default=50, help="steps at the end that the means are taken over")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps {args.steps} must be >= 2")
    result = run(args)
    if args.json:
        from diamond.io import atomic_write_json

        atomic_write_json(args.json, result)
    print(f"{'metric':<22}{'fp32 s0':>11}{'bf16 s0':>11}{'fp32 s1':>11}{'bf16-fp32':>11}{'s1-s0':>11}  within noise")
    for m in METRICS:
        print(f"{m:<22}" + "".join(f"{result[k]:>11.4g}" for k in (
            f"{m}_fp32_seed0", f"{m}_bf16_seed0", f"{m}_fp32_seed1", f"{m}_bf16_minus_fp32", f"{m}_fp32_seed1_minus_seed0"))
              + f"  {result[f'{m}_bf16_within_noise']}")
    for k in ("seconds_fp32_seed0", "seconds_bf16_seed0", "seconds_fp32_seed1"):
        print(f"{k}: {result[k]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
