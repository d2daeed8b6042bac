"""Aggregate throughput of K actor-critic trainers sharing one device (issue 28, part 3).

    python -m benchmarks.packed_throughput --json PATH [--params configs/paper.yaml] [--device cuda]
        [--ks 1 2 4 8] [--seconds 20] [--set actor_critic.horizon=3 ...]

For each K, K worker processes (this module with --worker) each build what train-agent's
actor-critic phase holds (benchmarks.bench.make_actor_critic_step: the params' denoiser, R with
its termination biased to "no", the actor-critic and its AdamW, an ImaginationEnv drawing real
starts from a small synthetic store) and take one warm-up step. When all K are ready they start
together and take actor-critic steps (imagination of `actor_critic.horizon` steps of
`actor_critic.batch_size` rows, loss, backward, AdamW) until --seconds have passed. Reported per
K: each worker's steps per second and peak memory (CUDA: max allocated and max reserved; and
the process's max resident set), and their sums:
- `actor_critic_steps_per_s`: actor-critic training steps per second, summed over the K workers;
- `imagined_steps_per_s`: batched imagined steps (one ImaginationEnv.step over all rows) per
  second, the former times the horizon;
- `imagined_frames_per_s`: the former times the batch size;
- `speedup_over_one`: the aggregate over K = 1's.
One paper run alone is K = 1; K runs packed on one GPU each progress at 1/K of the aggregate.

The workers apply the params' `tf32`, `channels_last` and `reuse_freed_memory` as the stages
do, but run eager unless --compile (the params' `compile_denoiser` and `compile_imagination`):
compiling the U-Net and the imagined step takes a minute or more per process, longer than the
measurement window, and K processes compile at once. The packing speedup measured eager is
then taken to hold for compiled steps too (benchmarks/gpu_check.sh says so where it uses it).

`--device cpu` runs the same at any config for a dry run (one torch thread per worker).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05  # how often a ready worker looks for the start signal


def load_params_with(path: Path, overrides: list[str]):
    """The params file with `key=value` overrides (values parsed as YAML), checked by diamond.config."""
    from benchmarks.gpu_smoke import set_key
    from diamond.config import params_from_dict

    data = yaml.safe_load(path.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        set_key(data, key, yaml.safe_load(value))
    return params_from_dict(data)


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA max allocated and reserved (MB) since the process started, and the max resident set (MB)."""
    out = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def worker(args: argparse.Namespace) -> None:
    """One train-agent-like process: build, warm up, signal ready, wait for the start, step until
    the window closes, write the figures to --result."""
    from benchmarks.bench import make_actor_critic_step, rarely_terminating, synthetic_store
    from diamond.allocator import reuse_freed_memory
    from diamond.data import SegmentSampler
    from diamond.world_model.denoiser import Denoiser
    from diamond.models.reward_end import RewardEndModel
    from diamond.training import compile_networks, set_memory_format, set_tf32

    p = load_params_with(args.params, args.set)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # K workers share the cores
    reuse_freed_memory(p.reuse_freed_memory)
    set_tf32(p.tf32)
    size, num_actions = p.env.obs_size, 18  # Atari's full action set, as benchmarks.bench
    torch.manual_seed(args.worker_index)
    den = Denoiser(p.world_model.denoiser, num_actions).to(device)
    reward_end = RewardEndModel(p.world_model.reward_end, num_actions, size, output_bias=True).to(device)
    set_memory_format(p.channels_last, den, reward_end)
    compile_networks(args.compile and p.compile_denoiser, den.net)
    rarely_terminating(reward_end)
    with tempfile.TemporaryDirectory() as tmp:
        segments = SegmentSampler(synthetic_store(Path(tmp) / "store", size), np.random.default_rng(args.worker_index))
        step_args = argparse.Namespace(obs_size=size, batch_size=p.actor_critic.batch_size, channels_last=p.channels_last,
                                       compile_imagination=args.compile and p.compile_imagination)
        step = make_actor_critic_step(p, den, reward_end, segments, step_args, device, bf16=False)
        step()  # warm-up (and compilation with --compile)
        sync(device)
        Path(f"{args.result}.ready").touch()
        while not args.start_signal.exists():
            time.sleep(POLL_S)
        steps, start = 0, time.perf_counter()
        while True:  # every step is finished and counted: the rate is steps over their own time
            step()
            sync(device)
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds:
                break
    result = {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, **peak_memory(device)}
    Path(args.result).write_text(json.dumps(result))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_k(args: argparse.Namespace, k: int, tmp: Path) -> dict:
    """K workers started together; their figures and sums (or the error of the first that failed)."""
    start_signal = tmp / f"k{k}.start"
    results = [tmp / f"k{k}_w{i}.json" for i in range(k)]
    base = [sys.executable, "-m", "benchmarks.packed_throughput", "--worker", "--params", str(args.params),
            "--device", args.device, "--seconds", str(args.seconds), "--start-signal", str(start_signal),
            *(["--compile"] if args.compile else []), *[f"--set={s}" for s in args.set]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([*base, "--worker-index", str(i), "--result", str(r)], cwd=ROOT, env=env)
             for i, r in enumerate(results)]
    t0 = time.perf_counter()
    try:
        while not all(Path(f"{r}.ready").exists() for r in results):
            if any(pr.poll() not in (None, 0) for pr in procs):
                raise RuntimeError("a worker failed before it was ready (its output is above)")
            if time.perf_counter() - t0 > args.worker_timeout:
                raise RuntimeError(f"workers not ready after {args.worker_timeout} s")
            time.sleep(POLL_S)
        ready_s = time.perf_counter() - t0
        start_signal.touch()
        for pr in procs:
            pr.wait(timeout=max(1.0, args.worker_timeout - (time.perf_counter() - t0)))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        return {"k": k, "error": str(e)}
    if any(pr.returncode != 0 for pr in procs):
        return {"k": k, "error": f"worker exit codes {[pr.returncode for pr in procs]}"}
    workers = [json.loads(r.read_text()) for r in results]
    return {"k": k, "startup_s": ready_s, "workers": workers, **aggregate(workers, args)}


def aggregate(workers: list[dict], args: argparse.Namespace) -> dict:
    """Sums over the K workers, in actor-critic steps, batched imagined steps and imagined frames."""
    p = load_params_with(args.params, args.set)
    ac_per_s = sum(w["steps_per_s"] for w in workers)
    out = {
        "actor_critic_steps_per_s": ac_per_s,
        "imagined_steps_per_s": ac_per_s * p.actor_critic.horizon,
        "imagined_frames_per_s": ac_per_s * p.actor_critic.horizon * p.actor_critic.batch_size,
        "actor_critic_step_s_per_worker_mean": float(np.mean([1 / w["steps_per_s"] for w in workers])),
    }
    for key in ("cuda_max_allocated_mb", "cuda_max_reserved_mb", "max_rss_mb"):
        if all(key in w for w in workers):
            out[f"peak_{key}_max"] = max(w[key] for w in workers)
    return out


def run(args: argparse.Namespace) -> dict:
    """Every K in turn; the JSON is rewritten after each, so a timeout keeps what was measured."""
    p = load_params_with(args.params, args.set)
    device = torch.device(args.device)
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "params": str(args.params), "overrides": args.set, "compiled": args.compile, "seconds": args.seconds,
        "horizon": p.actor_critic.horizon, "batch_size": p.actor_critic.batch_size, "obs_size": p.env.obs_size,
        "by_k": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            r = run_k(args, k, Path(tmp))
            result["by_k"][str(k)] = r
            one = result["by_k"].get("1", {}).get("actor_critic_steps_per_s")
            if one and "actor_critic_steps_per_s" in r:
                r["speedup_over_one"] = r["actor_critic_steps_per_s"] / one
            print(f"[packed] K={k}: " + (r.get("error") or
                  f"{r['actor_critic_steps_per_s']:.4g} actor-critic steps/s in all, {r['imagined_steps_per_s']:.4g} "
                  f"imagined steps/s, speedup {r.get('speedup_over_one', math.nan):.3g}"), flush=True)
            write(args.json, result)
    return result


def write(path: Path, result: dict) -> None:
    from diamond.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="where to write the figures (required without --worker)")
    ap.add_argument("--params", type=Path, default=ROOT / "configs" / "paper.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of concurrent workers")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window of each worker")
    ap.add_argument("--worker-timeout", type=float, default=150.0, help="seconds a K may take from launch to the end")
    ap.add_argument("--compile", action="store_true", help="apply the params' compile_denoiser and compile_imagination")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--start-signal", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker and args.json is None:
        ap.error("--json is required")
    if min(args.ks) < 1 or args.seconds <= 0:
        ap.error(f"--ks {args.ks} must be >= 1 and --seconds {args.seconds} > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
