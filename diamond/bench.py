"""Benchmark of the world model at the paper's config: `python -m diamond.bench --json PATH`.

Measures, in one process so that the figures are comparable:
- the machine's fp32 and bf16 matmul peak (best of a few large torch.matmul calls);
- the denoiser's training step (loss, backward, AdamW) at batch 32, 64x64, 4 conditioning frames
  with the U-Net of configs/paper.yaml, its FLOPs (torch.utils.flop_counter) and the fraction of
  the fp32 (and bf16) matmul peak it reaches;
- imagination throughput: next frames per second with the configured sampler (3 Euler steps);
- peak memory (CUDA: max allocated; CPU: the process's max resident set).
With --bf16 the step and sampler also run under bf16 autocast and the speedup over fp32 is
reported; --compare-bf16-steps N trains two identical denoisers (fp32 and bf16) for N steps on
the same learnable synthetic video and reports both losses.

Only torch, numpy and yaml are needed (no gymnasium), so it runs on a bare GPU machine.
Timings on a shared CPU are noisy: each figure is the best of several repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from diamond.config import WorldModelConfig, _build
from diamond.models.denoiser import Denoiser
from diamond.sampler import DiffusionSampler
from diamond.training import Trainer, compile_networks, set_memory_format

ROOT = Path(__file__).resolve().parents[1]
# Atari's full action set; the action embedding's size barely affects the cost.
BENCH_NUM_ACTIONS = 18


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
    data = yaml.safe_load(Path(path).read_text())
    return _build(WorldModelConfig, data["world_model"], "world_model")


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
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 10 if device.type == "cuda" else 1
    t = best_time(lambda: torch.matmul(a, b), device, reps, inner)
    return 2 * n**3 / t / 1e9


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_denoiser(cfg: WorldModelConfig, device: torch.device, channels_last: bool, compile_net: bool) -> Denoiser:
    torch.manual_seed(0)
    den = Denoiser(cfg.denoiser, BENCH_NUM_ACTIONS).to(device)
    set_memory_format(channels_last, den)
    compile_networks(compile_net, den.net)  # as the stages do with compile_denoiser
    return den


def make_train_step(den: Denoiser, cfg: WorldModelConfig, seg: BenchSegment, device: torch.device, bf16: bool):
    trainer = Trainer(den, cfg.denoiser_optimizer)

    def step() -> float:
        with autocast(device, bf16):
            loss, _ = den.compute_loss(seg)
        trainer.step(loss)
        return loss.item()

    return step


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
) -> dict[str, float]:
    """Time the training step and the sampler; with `profile`, also break one step down."""
    den = build_denoiser(cfg, device, args.channels_last, args.compile)
    step = make_train_step(den, cfg, seg, device, bf16)
    step_s = best_time(step, device, args.reps, args.inner)
    breakdown = profile(step) if profile is not None else {}
    sampler = DiffusionSampler(den, cfg.sampler)
    den.eval()

    def imagine() -> None:
        with autocast(device, bf16):
            sampler.sample(prev_obs, prev_act)

    sample_s = best_time(imagine, device, args.reps, args.inner)
    return {"train_step_s": step_s, "sample_frames_per_s": prev_obs.shape[0] / sample_s, **breakdown}


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
            seg = moving_square_segment(batch, cfg.denoiser.num_conditioning_frames, size, gen, device)
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
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the peak and the step
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_world_model_config(args.config)
    L, size, b = cfg.denoiser.num_conditioning_frames, args.obs_size, args.batch_size
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": str(args.config),
        "batch_size": b,
        "obs_size": size,
        "num_conditioning_frames": L,
        "sampler_num_steps": cfg.sampler.num_steps,
        "sampler_order": cfg.sampler.order,
        "channels_last": args.channels_last,
        "compile": args.compile,
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
    seg = moving_square_segment(b, L, size, gen, device)
    prev_obs, prev_act = seg.obs[:, :L], seg.act
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
    fp32 = bench_mode(cfg, device, args, False, seg, prev_obs, prev_act, profile)
    result["denoiser_train_step_s_fp32"] = fp32["train_step_s"]
    result["sample_frames_per_s_fp32"] = fp32["sample_frames_per_s"]
    result.update({k: v for k, v in fp32.items() if k.startswith("profile_")})
    result["train_step_fraction_of_fp32_peak"] = (
        result["train_step_flops"] / fp32["train_step_s"] / 1e9 / result["matmul_peak_gflops_fp32"]
    )
    main = fp32
    if args.bf16:
        bf = bench_mode(cfg, device, args, True, seg, prev_obs, prev_act)
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
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
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
