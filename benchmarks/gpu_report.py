"""The one report of benchmarks/gpu_check.sh: its parts' JSON files into reports/bench/<gpu>_<date>.json.

    python -m benchmarks.gpu_report --out DIR --side-by-side S.json --bench B.json --packed P.json
        [--params configs/paper.yaml] [--commit SHA] [--gpu NAME]

Reads what each part wrote (a part stopped by its timeout leaves its figures so far, or none:
the keys it would have given are then null) and writes DIR/reports/bench/<gpu>_<date>.json with
the figures of issue 28, part 3, and two projections:

- `paper_run_hours`: one paper run (one game, one seed) alone on the device, as
  benchmarks.bench.project_run counts it (docs/results.md projected 142.8 h this way on an
  H200): the optimiser steps of each model over the params' schedule (benchmarks.bench.run_schedule:
  the first epoch's world_model.denoiser_steps, reward_end_steps and
  agent.first_epoch_actor_critic_steps, then agent.*_steps_per_epoch for every collecting and every
  final epoch) times that model's step time: D's and R's from the bench part, the actor-critic's
  the faster of ours eager and compiled from the side-by-side part. Environment stepping,
  evaluation and checkpointing are left out, as there.
- `table1_gpu_hours`: the 130 runs of Table 1 (26 games x 5 seeds) at the best K of the packed
  part: 130 * paper_run_hours / speedup(K), speedup(K) being K workers' summed actor-critic steps
  per second over one worker's (K runs share a GPU, each at speedup(K)/K of its lone speed, so
  130 runs take 130/K GPUs for paper_run_hours * K/speedup(K) hours). D's and R's steps are taken
  to pack as the actor-critic's (89% of the H200 projection is the actor-critic), and the packed
  workers run eager (benchmarks.packed_throughput): both assumptions are in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE1_RUNS = 26 * 5  # Atari 100k's 26 games, 5 seeds each (the paper's Table 1)
ASSUMPTIONS = (
    "D and R steps pack on one GPU as the actor-critic step does; the packed workers ran eager and their "
    "speedup is applied to the faster of the eager and compiled actor-critic steps; D's step is timed without "
    "compile_denoiser; environment stepping, evaluation and checkpointing are excluded"
)


def read(path: Path | None) -> dict:
    """A part's JSON, or {} when it wrote none (stopped before its first figure, or failed)."""
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; anything else lower-cased, dashed."""
    words = re.sub(r"(?i)\bnvidia\b", "", name).strip().lower().split()
    return re.sub(r"[^a-z0-9]+", "-", words[0] if words else "unknown").strip("-") or "unknown"


def best_packing(packed: dict) -> tuple[int | None, float | None]:
    """The K with the highest summed actor-critic throughput over K = 1's, and that speedup."""
    by_k = {int(k): r for k, r in packed.get("by_k", {}).items() if "speedup_over_one" in r}
    if not by_k:
        return None, None
    k = max(by_k, key=lambda k: by_k[k]["speedup_over_one"])
    return k, by_k[k]["speedup_over_one"]


def actor_critic_step(side: dict) -> tuple[float | None, str | None]:
    """The faster of our eager and compiled actor-critic steps, and which it was."""
    found = {mode: side[f"ours_actor_critic_train_step_s_{mode}"] for mode in ("eager", "compiled")
             if f"ours_actor_critic_train_step_s_{mode}" in side}
    if not found:
        return None, None
    mode = min(found, key=found.get)
    return found[mode], mode


def project(params: Path, step_s: dict[str, float | None]) -> dict:
    """benchmarks.bench.project_run over the params' schedule, when every step time is known."""
    from benchmarks.bench import project_run, run_schedule
    from diamond.config import load_params

    if any(v is None for v in step_s.values()):
        return {"paper_run_hours": None}
    return project_run(run_schedule(load_params(params)), step_s)  # type: ignore[arg-type]


def report(args: argparse.Namespace) -> dict:
    side, bench, packed = read(args.side_by_side), read(args.bench), read(args.packed)
    ac_s, ac_mode = actor_critic_step(side)
    step_s = {"denoiser": bench.get("denoiser_train_step_s"), "reward_end": bench.get("reward_end_train_step_s"),
              "actor_critic": ac_s}
    out: dict = {
        "gpu": args.gpu, "date": args.date, "commit": args.commit,
        "torch": side.get("torch") or bench.get("torch") or packed.get("torch"), "params": str(args.params),
        # Part 1: the actor-critic step, ours eager and compiled and the official one, one process.
        "official_actor_critic_step_s": side.get("official_actor_critic_train_step_s"),
        "ours_actor_critic_step_s_eager": side.get("ours_actor_critic_train_step_s_eager"),
        "ours_actor_critic_step_s_compiled": side.get("ours_actor_critic_train_step_s_compiled"),
        "official_compile_wm": side.get("official_compile_wm"),
        # Part 2: D's and R's training steps.
        "denoiser_step_s": step_s["denoiser"], "reward_end_step_s": step_s["reward_end"],
        "denoiser_step_precision": bench.get("precision"), "bench_peak_memory_mb": bench.get("peak_memory_mb"),
        # Part 3: K concurrent workers.
        "packed": {k: {key: r.get(key) for key in ("actor_critic_steps_per_s", "imagined_steps_per_s",
                                                   "imagined_frames_per_s", "speedup_over_one", "error")}
                   | {"peak_memory_mb": [w.get("cuda_max_allocated_mb", w.get("max_rss_mb")) for w in r.get("workers", [])]}
                   for k, r in packed.get("by_k", {}).items()},
        "actor_critic_step_used": ac_mode,
    }
    if out["official_actor_critic_step_s"] and ac_s:
        out["ratio_official_over_ours_actor_critic_step"] = out["official_actor_critic_step_s"] / ac_s
    projection = project(args.params, step_s)
    out.update({k: v for k, v in projection.items() if k.startswith("paper_run_")})
    k, speedup = best_packing(packed)
    out["best_k"], out["best_k_speedup"] = k, speedup
    hours = out.get("paper_run_hours")
    out["table1_runs"] = TABLE1_RUNS
    out["table1_gpu_hours"] = TABLE1_RUNS * hours / speedup if hours and speedup else None
    out["table1_gpu_hours_unpacked"] = TABLE1_RUNS * hours if hours else None
    out["assumptions"] = ASSUMPTIONS
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the report goes to OUT/reports/bench/<gpu>_<date>.json")
    ap.add_argument("--side-by-side", type=Path)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--packed", type=Path)
    ap.add_argument("--params", type=Path, default=ROOT / "configs" / "paper.yaml", help="whose schedule to project")
    ap.add_argument("--gpu", default="", help="the device's name (default: torch's, or 'cpu')")
    ap.add_argument("--commit", default="")
    ap.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    args = ap.parse_args(argv)
    if not args.gpu:
        import torch

        args.gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> Path:
    from diamond.io import atomic_write_json

    args = parse_args(argv)
    out = report(args)
    path = args.out / "reports" / "bench" / f"{gpu_slug(args.gpu)}_{args.date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    for key, value in out.items():
        if not isinstance(value, dict):
            print(f"{key}: {value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{key}: {value}")
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
    sys.exit(0)
