"""Benchmark of the world model at the paper's config: `python -m benchmarks.bench --json PATH`.

Measures, in one process so that the figures are comparable:
- the machine's fp32 and bf16 matmul peak (best of a few large torch.matmul calls and, on CPU,
  the same product on oneDNN as a 1x1 convolution);
- the denoiser's training step (loss, backward, AdamW) at batch 32, 64x64, 4 conditioning frames
  and the configured autoregressive targets (paper.yaml: 2 per sample) with the U-Net of
  configs/paper.yaml, its FLOPs (torch.utils.flop_counter) and the fraction of the fp32 (and
  bf16) matmul peak it reaches;
- imagination throughput: next frames per second with the configured sampler (3 Euler steps);
- one training step of the reward/termination model R (loss on a segment of
  `reward_end.segment_length` steps, backward, AdamW) and one actor-critic step in imagination
  as train-agent takes it (diamond.agent.policy.imagination_loss over an ImaginationEnv of the
  configured horizon and sampler, drawing real starts with a SegmentSampler from a small
  synthetic EpisodeStore, then the actor-critic's AdamW step), both at the same batch size;
- `paper_run_hours`: the hours these three steps take over one run (one game, one seed) of the
  config's schedule (docs/architecture.md §3.5: the first epoch's D, R and actor-critic steps, then D, R and
  actor-critic steps per epoch for every collecting epoch and every final epoch), split into
  `paper_run_hours_denoiser`, `_reward_end` and `_actor_critic`. Environment stepping
  (collection), evaluation, checkpointing and drawing the D and R batches from the dataset are
  excluded (`paper_run_hours_excludes`; `segment_batch_draw_s` gives the last one per batch);
- peak memory (CUDA: max allocated; CPU: the process's max resident set).
--skip-actor-critic leaves out the actor-critic step and the projection (benchmarks/gpu_check.sh
times that step beside the official one and projects from there).
With --bf16 the step and sampler also run under bf16 autocast and the speedup over fp32 is
reported (the R step and the actor-critic step's sampling, and so the projection, then run
under bf16 only; the actor-critic and R stay fp32 in imagination, see AutocastSampler);
--compare-bf16-steps N trains two identical denoisers (fp32 and bf16) for N steps on the same
learnable synthetic video and reports both losses. --reuse-freed-memory first times D's and R's
fp32 steps with the C library's allocator as found, then keeps freed memory in the process
(params `reuse_freed_memory`, diamond.allocator) for everything after, and reports the speedups
(R's without --bf16 only, since R's later step then runs under bf16).

Only torch, numpy and yaml are needed (no gymnasium), so it runs on a bare GPU machine.
Timings on a shared CPU are noisy: each figure is the best of several repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diamond.agent.imagination import ImaginationEnv
from diamond.agent.policy import compiled_forward, imagination_loss
from diamond.allocator import reuse_freed_memory
from diamond.config import Params, SamplerConfig, WorldModelConfig, load_params
from diamond.data import Episode, EpisodeStore, SegmentSampler
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer, compile_networks, set_memory_format, set_tf32
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.sampler import DiffusionSampler

ROOT = Path(__file__).resolve().parents[1]
# Atari's full action set; the action embedding's size barely affects the cost.
BENCH_NUM_ACTIONS = 18
# The synthetic dataset the actor-critic's imagination starts from: at least 4 episodes, so the
# sampler's recency weights apply as in a real run; their length does not affect the step's cost.
BENCH_EPISODES, BENCH_EPISODE_STEPS = 8, 64
# Logit margin for "no termination" given to the untrained R in the actor-critic step (see
# rarely_terminating): e^-10 odds, i.e. rows end only at the horizon.
NO_END_LOGIT = 5.0
PROJECTION_EXCLUDES = (
    "environment stepping (the initial collection and each epoch's collection), test and final evaluation "
    "episodes, checkpointing, process and compilation start-up, and drawing the D and R training batches "
    "from the dataset (segment_batch_draw_s per batch)"
)


@dataclass
class BenchSegment:
    """The fields of diamond.data.Segment that the denoiser's loss reads, as tensors."""

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    mask: torch.Tensor


def load_world_model_config(path: Path) -> WorldModelConfig:
    """The world_model section of a params file, read and checked by diamond.config.load_params
    (which imports no emulator, so this runs on a machine with torch alone)."""
    return load_params(path).world_model


def moving_square_segment(batch: int, steps: int, size: int, gen: torch.Generator, device: torch.device) -> BenchSegment:
    """A learnable toy video: a coloured square moved by the action (up/down/left/right/stay)."""
    moves = torch.tensor([[0, 0], [-4, 0], [4, 0], [0, -4], [0, 4]])
    act = torch.randint(0, len(moves), (batch, steps), generator=gen)
    start = torch.randint(8, size - 16, (batch, 1, 2), generator=gen)
    pos = torch.cat([start, start + moves[act].cumsum(1)], dim=1).clamp(0, size - 8)  # (B, steps+1, 2)
    ys = torch.arange(size)[None, None, :, None]
    xs = torch.arange(size)[None, None, None, :]
    inside = (ys >= pos[..., 0, None, None]) & (ys < pos[..., 0, None, None] + 8)
    inside = inside & (xs >= pos[..., 1, None, None]) & (xs < pos[..., 1, None, None] + 8)
    colour = torch.rand(batch, 1, 3, 1, 1, generator=gen) * 2 - 1
    background = torch.rand(batch, 1, 3, 1, 1, generator=gen) * 2 - 1
    obs = torch.where(inside[:, :, None], colour, background)
    obs = ((obs + 1) * 127.5).round() / 127.5 - 1
    z = torch.zeros(batch, steps)
    return BenchSegment(
        obs=obs.to(device), act=act.to(device), rew=z.to(device), terminated=z.bool().to(device),
        truncated=z.bool().to(device), mask=torch.ones(batch, steps + 1, dtype=torch.bool, device=device),
    )


def cpu_name() -> str:
    """The CPU's model, family and model number (/proc/cpuinfo): the shared machines differ by
    session, and the fraction of peak depends on which one ran."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "cpu"
    info = dict(line.split(":", 1) for line in lines[:30] if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    name = info.get("model name", platform.processor() or "cpu")
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], None], device: torch.device, reps: int, inner: int = 1) -> float:
    """Best over `reps` repetitions of the mean time of `inner` calls (after one warm-up call)."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """The best GEMM throughput this torch reaches on an n x n x n product.

    On CPU the same product also runs as a 1x1 channels-last convolution, which oneDNN computes
    instead of the BLAS behind torch.matmul (MKL), and the faster of the two counts: on the AMD
    EPYC of some sessions oneDNN's GEMM was ~13% faster than MKL's, and the denoiser's own
    convolutions run on oneDNN, so MKL alone would understate the peak they are held against.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 10 if device.type == "cuda" else 1
    t = best_time(lambda: torch.matmul(a, b), device, reps, inner)
    if device.type == "cpu":
        # (1, n, n, 1) NHWC input: n pixels of n channels; n x n weights: the same 2 n^3 FLOPs.
        x = a.T[None, :, :, None].contiguous(memory_format=torch.channels_last)
        w = b.T[:, :, None, None].contiguous(memory_format=torch.channels_last)
        t = min(t, best_time(lambda: torch.nn.functional.conv2d(x, w), device, reps, inner))
    return 2 * n**3 / t / 1e9


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class AutocastSampler(DiffusionSampler):
    """The configured sampler with the denoiser under bf16 autocast when `bf16`.

    The actor-critic step takes its bf16 this way, the sampler only: the actor-critic and R stay
    fp32 in imagination, because under CUDA autocast ActorCritic.restart_rows mixes a bf16 LSTM
    state with an fp32 burn-in (its padding mask promotes it) and fails. The sampler returns
    fp32 frames (Denoiser.denoise casts the network's output), so nothing else sees bf16.
    """

    def __init__(self, denoiser: Denoiser, cfg: SamplerConfig, device: torch.device, bf16: bool) -> None:
        super().__init__(denoiser, cfg, quantization=denoiser.cfg.quantization)
        self.device, self.bf16 = device, bf16

    def sample(
        self, prev_obs: torch.Tensor, prev_act: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            return super().sample(prev_obs, prev_act, generator)


def build_denoiser(cfg: WorldModelConfig, device: torch.device, channels_last: bool, compile_net: bool) -> Denoiser:
    torch.manual_seed(0)
    den = Denoiser(cfg.denoiser, BENCH_NUM_ACTIONS).to(device)
    set_memory_format(channels_last, den)
    compile_networks(compile_net, den.net)  # as the stages do with compile_denoiser
    return den


def make_optimiser_step(
    trainer: Trainer, loss_fn: Callable[[], torch.Tensor], device: torch.device, bf16: bool
) -> Callable[[], float]:
    """One training step as the stages take it: the loss (under bf16 autocast with --bf16), then
    the model's Trainer step (backward, clipping, AdamW)."""

    def step() -> float:
        with autocast(device, bf16):
            loss = loss_fn()
        trainer.step(loss)
        return loss.item()

    return step


def make_train_step(den: Denoiser, cfg: WorldModelConfig, seg: BenchSegment, device: torch.device, bf16: bool):
    return make_optimiser_step(Trainer(den, cfg.denoiser_optimizer), lambda: den.compute_loss(seg)[0], device, bf16)


def count_train_step_flops(cfg: WorldModelConfig, seg: BenchSegment, device: torch.device) -> dict[str, int]:
    """FLOPs of one loss + backward: the total, and the convolutions' forward and backward parts."""
    from torch.utils.flop_counter import FlopCounterMode

    den = build_denoiser(cfg, device, channels_last=False, compile_net=False)
    with FlopCounterMode(display=False) as counter:
        loss, _ = den.compute_loss(seg)
        loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "total": int(counter.get_total_flops()),
        "conv_forward": int(by_op.get("aten.convolution", 0)),
        "conv_backward": int(by_op.get("aten.convolution_backward", 0)),
    }


def profile_train_step(step: Callable[[], float], flops: dict[str, int], peak_gflops: float) -> dict[str, float]:
    """Where one training step's CPU time goes: convolution forward, convolution backward, and the
    rest (normalisation, activations, additions and copies, fused or not; optimiser; framework).

    Each convolution part is also given as a fraction of the matmul peak, and
    `profile_conv_only_fraction_of_peak` is the step's fraction of peak if the rest took no time:
    the ceiling that faster non-convolution code alone could reach.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds = {"conv_forward": 0.0, "conv_backward": 0.0, "other": 0.0}
    for evt in prof.key_averages():
        if "convolution_backward" in evt.key:
            part = "conv_backward"
        elif evt.key in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"):
            part = "conv_forward"
        else:
            part = "other"
        seconds[part] += evt.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    out = {f"profile_{k}_s": v for k, v in seconds.items()}
    out["profile_step_s"] = total
    out["profile_other_share"] = seconds["other"] / total
    for part in ("conv_forward", "conv_backward"):
        out[f"profile_{part}_fraction_of_peak"] = flops[part] / max(seconds[part], 1e-12) / 1e9 / peak_gflops
    conv_s = seconds["conv_forward"] + seconds["conv_backward"]
    out["profile_conv_only_fraction_of_peak"] = flops["total"] / conv_s / 1e9 / peak_gflops
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_mode(
    cfg, device, args, bf16: bool, seg, prev_obs, prev_act,
    profile: Callable[[Callable[[], float]], dict[str, float]] | None = None,
) -> tuple[dict[str, float], Denoiser]:
    """Time the training step and the sampler; with `profile`, also break one step down.

    Returns the figures and the denoiser, already compiled (with --compile) for sampling, so the
    actor-critic step imagines with it without compiling another one."""
    den = build_denoiser(cfg, device, args.channels_last, args.compile)
    step = make_train_step(den, cfg, seg, device, bf16)
    step_s = best_time(step, device, args.reps, args.inner)
    breakdown = profile(step) if profile is not None else {}
    sampler = AutocastSampler(den, cfg.sampler, device, bf16)
    den.eval()

    def imagine() -> None:
        sampler.sample(prev_obs, prev_act)

    sample_s = best_time(imagine, device, args.reps, args.inner)
    return {"train_step_s": step_s, "sample_frames_per_s": prev_obs.shape[0] / sample_s, **breakdown}, den


def compare_allocator(
    cfg: WorldModelConfig, device: torch.device, args: argparse.Namespace, seg: BenchSegment
) -> dict:
    """Time D's and R's fp32 training steps with the C library's allocator as the process found it,
    then keep freed memory in the process (`diamond.allocator`, as the stages' `reuse_freed_memory`)
    for the rest of the bench, whose fp32 steps give the speedups."""
    den = build_denoiser(cfg, device, args.channels_last, args.compile)
    d_s = best_time(make_train_step(den, cfg, seg, device, False), device, args.reps, args.inner)
    del den
    with tempfile.TemporaryDirectory() as tmp:
        segments = SegmentSampler(synthetic_store(Path(tmp) / "store", args.obs_size), np.random.default_rng(0))
        r_s, _ = time_reward_end_step(cfg, segments, args, device, False)
    return {"denoiser_train_step_s_fp32_allocator_as_found": d_s, "reward_end_train_step_s_fp32_allocator_as_found": r_s,
            "reuse_freed_memory": reuse_freed_memory(True)}


def synthetic_store(root: Path, size: int) -> EpisodeStore:
    """A small real EpisodeStore of moving-square episodes, for the real SegmentSampler to draw from."""
    gen = torch.Generator().manual_seed(3)
    video = moving_square_segment(BENCH_EPISODES, BENCH_EPISODE_STEPS, size, gen, torch.device("cpu"))
    frames = ((video.obs + 1) * 127.5).round().to(torch.uint8).numpy()
    store = EpisodeStore(root, game="BenchMovingSquare", num_actions=BENCH_NUM_ACTIONS)
    steps = BENCH_EPISODE_STEPS
    for i in range(BENCH_EPISODES):
        truncated = np.zeros(steps, dtype=bool)
        truncated[-1] = True  # stored before it ended, as a budget cut does
        store.append(Episode(obs=frames[i], act=video.act[i].numpy(), rew=np.zeros(steps, dtype=np.float32),
                             terminated=np.zeros(steps, dtype=bool), truncated=truncated))
    return store


def make_reward_end_step(
    model: RewardEndModel, cfg: WorldModelConfig, segments: SegmentSampler, batch: int, device: torch.device, bf16: bool
) -> Callable[[], float]:
    """R's training step as train-world-model and train-agent take it, on one fixed batch (like the
    denoiser's step, so drawing the batch is not timed)."""
    seg = segments.sample(batch, cfg.reward_end.segment_length).to_torch(device)
    trainer = Trainer(model, cfg.reward_end_optimizer)
    return make_optimiser_step(trainer, lambda: model.compute_loss(seg)[0], device, bf16)


def time_reward_end_step(
    cfg: WorldModelConfig, segments: SegmentSampler, args: argparse.Namespace, device: torch.device, bf16: bool
) -> tuple[float, RewardEndModel]:
    """R's training step time, and the R it trained."""
    torch.manual_seed(0)
    reward_end = RewardEndModel(cfg.reward_end, BENCH_NUM_ACTIONS, args.obs_size, output_bias=True).to(device)
    set_memory_format(args.channels_last, reward_end)  # R is never compiled (compile_denoiser)
    r_step = make_reward_end_step(reward_end, cfg, segments, args.batch_size, device, bf16)
    return best_time(r_step, device, args.reps, args.inner), reward_end


def rarely_terminating(model: RewardEndModel) -> None:
    """Bias R's termination head towards "no", as a trained R predicts on almost every frame.

    An untrained R predicts termination for about half the rows at every imagined step; each
    ended row restarts from a fresh real segment (a draw and an R and actor-critic warm-up), so
    the step would cost more than in a real run. Biased, rows end at the horizon only.
    """
    with torch.no_grad():
        model.head[-1].bias[-2:].copy_(torch.tensor([NO_END_LOGIT, -NO_END_LOGIT]))


def make_actor_critic_step(
    bcfg: Params, den: Denoiser, reward_end: RewardEndModel, segments: SegmentSampler,
    args: argparse.Namespace, device: torch.device, bf16: bool,
) -> Callable[[], float]:
    """One actor-critic step in imagination, built and taken as diamond.agent.loop._train_actor_critic does."""
    torch.manual_seed(0)
    ac = ActorCritic(bcfg.actor_critic, BENCH_NUM_ACTIONS, args.obs_size).to(device)
    # stages/train_agent.py sets all three networks' layout (D's and R's are set already) and
    # compiles the U-Net only (done in build_denoiser).
    set_memory_format(args.channels_last, ac)
    trainer = Trainer(ac, bcfg.actor_critic.optimizer)
    sampler = AutocastSampler(den, bcfg.world_model.sampler, device, bf16)
    compiled = getattr(args, "compile_imagination", False)
    imagination = ImaginationEnv(sampler, reward_end, segments, bcfg.world_model.denoiser.num_conditioning_frames,
                                 args.batch_size, bcfg.actor_critic.horizon, device, compile=compiled)
    forward = compiled_forward(ac) if compiled else None  # as diamond.agent.loop under compile_imagination
    den.eval()
    reward_end.eval()
    ac.train()

    def loss_fn() -> torch.Tensor:
        return imagination_loss(ac, imagination, bcfg.actor_critic, forward)[0]

    return make_optimiser_step(trainer, loss_fn, device, bf16=False)  # bf16: in the sampler only


def bench_agent_steps(
    bcfg: Params, den: Denoiser, args: argparse.Namespace, device: torch.device, bf16: bool
) -> dict[str, float]:
    """Time R's training step, one actor-critic step in imagination, and one draw of an R batch."""
    cfg = bcfg.world_model
    with tempfile.TemporaryDirectory() as tmp:
        segments = SegmentSampler(synthetic_store(Path(tmp) / "store", args.obs_size), np.random.default_rng(0))
        r_s, reward_end = time_reward_end_step(cfg, segments, args, device, bf16)
        rarely_terminating(reward_end)
        extra: dict[str, float] = {}
        if not args.skip_actor_critic:
            ac_step = make_actor_critic_step(bcfg, den, reward_end, segments, args, device, bf16)
            extra["actor_critic_train_step_s"] = best_time(ac_step, device, args.reps, args.inner)
        if args.compile_imagination and not args.skip_actor_critic:  # the same step with compile_imagination, beside the eager one
            compiled_args = argparse.Namespace(**{**vars(args), "compile_imagination": True})
            ac_step = make_actor_critic_step(bcfg, den, reward_end, segments, compiled_args, device, bf16)
            extra["actor_critic_train_step_s_eager"] = extra["actor_critic_train_step_s"]
            extra["actor_critic_train_step_s_compiled_imagination"] = ac_s = best_time(ac_step, device, args.reps, args.inner)
            extra["actor_critic_train_step_s"] = ac_s
            extra["compile_imagination_speedup"] = extra["actor_critic_train_step_s_eager"] / ac_s

        def draw() -> None:
            segments.sample(args.batch_size, cfg.reward_end.segment_length).to_torch(device)

        draw_s = best_time(draw, device, args.reps, args.inner)
    return {"reward_end_train_step_s": r_s, "segment_batch_draw_s": draw_s, **extra}


@dataclass(frozen=True)
class RunSchedule:
    """Optimiser steps of one run (one game, one seed; docs/architecture.md §3.5) as diamond.agent.loop counts them."""

    initial_env_steps: int
    collect_epochs: int
    epochs: int
    denoiser_steps: int
    reward_end_steps: int
    actor_critic_steps: int


def run_schedule(bcfg: Params) -> RunSchedule:
    """The first epoch (D and R: train-world-model; actor-critic: epoch 0 of train-agent), then
    the per-epoch steps of every collecting and every final epoch."""
    a, wm = bcfg.agent, bcfg.world_model
    # The initial collection stops at collect.min_steps once the minority reward classes hold
    # enough rewards, as in most games; a game that needs up to max_steps has fewer epochs.
    initial = bcfg.collect.min_steps
    collecting = a.collect_epochs(initial)
    later = collecting + a.final_epochs_without_collection  # epochs after the first
    return RunSchedule(
        initial_env_steps=initial, collect_epochs=collecting, epochs=1 + later,
        denoiser_steps=wm.denoiser_steps + later * a.denoiser_steps_per_epoch,
        reward_end_steps=wm.reward_end_steps + later * a.reward_end_steps_per_epoch,
        actor_critic_steps=a.first_epoch_actor_critic_steps + later * a.actor_critic_steps_per_epoch,
    )


def project_run(schedule: RunSchedule, step_s: dict[str, float]) -> dict:
    """Hours of training work in one run: each model's steps times its step time, and their sum."""
    parts = {
        "denoiser": schedule.denoiser_steps * step_s["denoiser"] / 3600,
        "reward_end": schedule.reward_end_steps * step_s["reward_end"] / 3600,
        "actor_critic": schedule.actor_critic_steps * step_s["actor_critic"] / 3600,
    }
    out: dict = {f"paper_run_{k}": v for k, v in dataclasses.asdict(schedule).items()}
    out.update({f"paper_run_hours_{k}": v for k, v in parts.items()})
    out["paper_run_hours"] = sum(parts.values())
    out["paper_run_days"] = out["paper_run_hours"] / 24
    out["paper_run_hours_excludes"] = PROJECTION_EXCLUDES
    return out


def compare_bf16(cfg: WorldModelConfig, device: torch.device, steps: int, batch: int, size: int) -> dict:
    """Train fp32 and bf16 denoisers from the same init on the same data and noise; compare losses."""
    curves = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        den = build_denoiser(cfg, device, channels_last=False, compile_net=False)
        trainer = Trainer(den, cfg.denoiser_optimizer)
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # the training noise draws: identical sequences in both runs
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            seg = moving_square_segment(batch, cfg.denoiser.training_segment_steps, size, gen, device)
            with autocast(device, bf16):
                loss, _ = den.compute_loss(seg)
            trainer.step(loss)
            losses.append(loss.item())
        curves[name] = {"losses": losses, "seconds": time.perf_counter() - t0}
    tail = max(1, min(50, steps // 4))
    out: dict = {"compare_steps": steps, "compare_batch_size": batch, "compare_tail_steps": tail}
    for name, c in curves.items():
        last = torch.tensor(c["losses"][-tail:], dtype=torch.float64)
        out[f"compare_loss_first_{name}"] = c["losses"][0]
        out[f"compare_loss_last_mean_{name}"] = last.mean().item()
        out[f"compare_loss_last_sem_{name}"] = (last.std() / math.sqrt(tail)).item() if tail > 1 else 0.0
        out[f"compare_seconds_{name}"] = c["seconds"]
    diff = abs(out["compare_loss_last_mean_fp32"] - out["compare_loss_last_mean_bf16"])
    noise = 2 * math.hypot(out["compare_loss_last_sem_fp32"], out["compare_loss_last_sem_bf16"])
    out["compare_loss_abs_diff"] = diff
    out["compare_loss_within_noise"] = bool(diff <= noise)
    out["compare_speedup_bf16"] = curves["fp32"]["seconds"] / curves["bf16"]["seconds"]
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    set_tf32(args.tf32)  # off by default: fp32 means fp32 in the peak and the step
    bcfg = load_params(args.config)
    cfg = bcfg.world_model
    L, size, b = cfg.denoiser.num_conditioning_frames, args.obs_size, args.batch_size
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": str(args.config),
        "batch_size": b,
        "obs_size": size,
        "num_conditioning_frames": L,
        "sampler_num_steps": cfg.sampler.num_steps,
        "sampler_order": cfg.sampler.order,
        "channels_last": args.channels_last,
        "tf32": args.tf32,
        "compile": args.compile,
        "compile_imagination": args.compile_imagination,
        "bf16": args.bf16,
    }
    den = Denoiser(cfg.denoiser, BENCH_NUM_ACTIONS)
    result["denoiser_parameters"] = sum(p.numel() for p in den.parameters())
    del den
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    result["matmul_size"] = n
    result["matmul_peak_gflops_fp32"] = matmul_peak_gflops(torch.float32, device, n, args.reps + 2)
    result["matmul_peak_gflops_bf16"] = matmul_peak_gflops(torch.bfloat16, device, n, args.reps + 2)

    gen = torch.Generator().manual_seed(0)
    seg = moving_square_segment(b, cfg.denoiser.training_segment_steps, size, gen, device)
    prev_obs, prev_act = seg.obs[:, :L], seg.act[:, :L]
    flops = count_train_step_flops(cfg, seg, device)
    result["train_step_flops"] = flops["total"]
    result["train_step_conv_forward_flops"] = flops["conv_forward"]
    result["train_step_conv_backward_flops"] = flops["conv_backward"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    profile = None
    if args.profile:
        if device.type != "cpu":
            raise SystemExit(f"--profile: the breakdown reads CPU op times; not available on {device.type}")
        profile = functools.partial(profile_train_step, flops=flops, peak_gflops=result["matmul_peak_gflops_fp32"])
    result["reuse_freed_memory"] = False
    if args.reuse_freed_memory:
        result.update(compare_allocator(cfg, device, args, seg))
    fp32, den = bench_mode(cfg, device, args, False, seg, prev_obs, prev_act, profile)
    if args.reuse_freed_memory:
        result["reuse_freed_memory_train_step_speedup"] = (
            result["denoiser_train_step_s_fp32_allocator_as_found"] / fp32["train_step_s"]
        )
    result["denoiser_train_step_s_fp32"] = fp32["train_step_s"]
    result["sample_frames_per_s_fp32"] = fp32["sample_frames_per_s"]
    result.update({k: v for k, v in fp32.items() if k.startswith("profile_")})
    result["train_step_fraction_of_fp32_peak"] = (
        result["train_step_flops"] / fp32["train_step_s"] / 1e9 / result["matmul_peak_gflops_fp32"]
    )
    main = fp32
    if args.bf16:
        del den  # only the fastest path's denoiser imagines for the actor-critic
        bf, den = bench_mode(cfg, device, args, True, seg, prev_obs, prev_act)
        result["denoiser_train_step_s_bf16"] = bf["train_step_s"]
        result["sample_frames_per_s_bf16"] = bf["sample_frames_per_s"]
        result["bf16_train_step_speedup"] = fp32["train_step_s"] / bf["train_step_s"]
        result["bf16_sample_speedup"] = bf["sample_frames_per_s"] / fp32["sample_frames_per_s"]
        result["train_step_fraction_of_bf16_peak"] = (
            result["train_step_flops"] / bf["train_step_s"] / 1e9 / result["matmul_peak_gflops_bf16"]
        )
        main = bf
    # The headline keys describe the fastest path asked for (bf16 when --bf16).
    result["precision"] = "bf16" if args.bf16 else "fp32"
    result["denoiser_train_step_s"] = main["train_step_s"]
    result["sample_frames_per_s"] = main["sample_frames_per_s"]
    result["train_step_gflops_per_s"] = result["train_step_flops"] / main["train_step_s"] / 1e9
    result.update(bench_agent_steps(bcfg, den, args, device, args.bf16))
    if args.reuse_freed_memory and not args.bf16:  # with --bf16, R's step above ran under bf16
        result["reuse_freed_memory_reward_end_step_speedup"] = (
            result["reward_end_train_step_s_fp32_allocator_as_found"] / result["reward_end_train_step_s"]
        )
    if not args.skip_actor_critic:
        step_s = {"denoiser": main["train_step_s"], "reward_end": result["reward_end_train_step_s"],
                  "actor_critic": result["actor_critic_train_step_s"]}
        result.update(project_run(run_schedule(bcfg), step_s))
    result["peak_memory_mb"] = peak_memory_mb(device)
    if args.compare_bf16_steps:
        cmp_cfg = load_world_model_config(args.compare_config)
        result["compare_config"] = str(args.compare_config)
        result.update(compare_bf16(cmp_cfg, device, args.compare_bf16_steps, b, size))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the figures")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.yaml", help="params file of the U-Net")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--obs-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timing repetitions; the best is kept")
    p.add_argument("--inner", type=int, default=1, help="calls per timing repetition")
    p.add_argument("--matmul-size", type=int, default=0, help="matmul side for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast and report its speedup")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA, as params tf32 (paper.yaml)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--compile-imagination", action="store_true",
                   help="also time the actor-critic step with params compile_imagination (compiled imagined step); "
                        "the projection then uses it")
    p.add_argument("--skip-actor-critic", action="store_true",
                   help="D and R steps only, no actor-critic step and so no projection (gpu_check.sh times it "
                        "beside the official one)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="time the fp32 step with the allocator as found, then keep freed memory in the process "
                        "(params reuse_freed_memory) for the rest")
    p.add_argument("--profile", action="store_true",
                   help="CPU: split the fp32 step's time into convolution forward/backward and the rest")
    p.add_argument("--compare-bf16-steps", type=int, default=0, help="train fp32 and bf16 this many steps; compare losses")
    p.add_argument("--compare-config", type=Path, default=ROOT / "params.yaml", help="params file for the comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    from diamond.io import atomic_write_json

    atomic_write_json(args.json, result)
    for k, v in result.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
