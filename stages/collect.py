"""Stage collect: the initial collection of docs/architecture.md §3.5 for one game and one seed.

The uniform policy collects in chunks of `collect.chunk_steps` until the dataset holds at least
`collect.min_steps` steps and `collect.min_minority_rewards` rewards outside the most frequent
reward class (sign of reward), or `collect.max_steps` steps. The unfinished last episode is kept,
cut (truncated) where collection stopped. The dataset is built beside its final path and renamed
into place, so a killed run never leaves a partial dataset.

    python -m stages.collect --params params.yaml --game Breakout --seed 0 \
        --out-dataset runs/Breakout-0/dataset_initial --out-stats runs/Breakout-0/collect.json
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diamond.config import CollectConfig
from diamond.data import EpisodeStore
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, EpisodeStats, UniformPolicy
from diamond.io import atomic_directory, atomic_write_json
from diamond.seeds import COLLECT_POLICY, stream_rng
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.tracking import stage_run

# Stream of the run seed that drives the uniform policy (the env has its own, seeded by `seed`).


def minority_rewards(reward_counts: dict[int, int]) -> int:
    """Rewards outside the most frequent class of sign(reward) (usually 0)."""
    return sum(reward_counts.values()) - max(reward_counts.values())


def initial_collection(
    collector: Collector, c: CollectConfig, on_chunk: Callable[[int, int], None] | None = None
) -> tuple[str, list[EpisodeStats]]:
    """Collect until the stopping rule of docs/architecture.md §3.5 holds, then store the unfinished episode.

    Returns why collection stopped and the stats of every stored episode.
    """
    episodes: list[EpisodeStats] = []
    while True:
        episodes += collector.collect(min(c.chunk_steps, c.max_steps - collector.total_steps))
        minority = minority_rewards(collector.reward_counts)
        if on_chunk is not None:
            on_chunk(collector.total_steps, minority)
        if collector.total_steps >= c.max_steps:
            stopped = "max_steps"
            break
        if collector.total_steps >= c.min_steps and minority >= c.min_minority_rewards:
            stopped = "min_steps_and_minority_rewards"
            break
    last = collector.flush()
    return stopped, episodes + ([last] if last is not None else [])


def statistics(game: str, seed: int, store: EpisodeStore, collector: Collector,
               episodes: list[EpisodeStats], stopped: str) -> dict[str, Any]:
    returns = [e.ret for e in episodes]
    counts = collector.reward_counts
    return {
        "game": game,
        "seed": seed,
        "steps": store.num_steps,
        "episodes": len(store),
        "returns": returns,
        "mean_return": float(np.mean(returns)) if returns else 0.0,
        "game_scores": [e.game_score for e in episodes if e.game_over],  # whole games of the random policy
        "reward_counts": {"negative": counts[-1], "zero": counts[0], "positive": counts[1]},
        "minority_rewards": minority_rewards(counts),
        "terminated_episodes": sum(e.terminated for e in episodes),
        "truncated_episodes": sum(e.truncated for e in episodes),
        "stopped": stopped,
    }


def main() -> None:
    parser = base_parser("Initial collection with the uniform policy (docs/architecture.md §3.5).")
    parser.add_argument("--out-dataset", required=True, type=Path, help="episode store directory to write")
    parser.add_argument("--out-stats", required=True, type=Path, help="JSON of collection statistics to write")
    args = parser.parse_args()
    p = load_checked_params(args)
    forget_provenance(args.out_dataset.parent, "collect")
    game, seed = args.game, args.seed

    with stage_run("collect", sections=stage_sections(p, "collect"), game=game, seed=seed, inputs=[],
                   job_dir=args.out_dataset.parent):
        with atomic_directory(args.out_dataset) as tmp:
            n = num_actions(game)
            store = EpisodeStore(tmp, game=game, num_actions=n)
            env = make_env(game, seed, train=True, config=p.env)
            policy = UniformPolicy(n, stream_rng(seed, COLLECT_POLICY))
            collector = Collector(env, policy, store)

            def on_chunk(steps: int, minority: int) -> None:
                tracking.log_metrics({"collected_steps": steps, "minority_rewards": minority}, step=steps)

            start = time.perf_counter()
            stopped, episodes = initial_collection(collector, p.collect, on_chunk)
            seconds = time.perf_counter() - start
            env.close()
        stats = statistics(game, seed, store, collector, episodes, stopped)
        atomic_write_json(args.out_stats, stats)
        tracking.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and k != "seed"})
        tracking.log_metrics({f"reward_count_{k}": v for k, v in stats["reward_counts"].items()})
        tracking.log_metric("env_steps_per_second", collector.total_steps / max(seconds, 1e-9))
        tracking.log_artifact(str(args.out_stats))
        print(f"collect {game}-{seed}: {stats['steps']} steps, {stats['episodes']} episodes, "
              f"{stats['minority_rewards']} minority rewards ({stopped}) -> {args.out_dataset}")


if __name__ == "__main__":
    run_main(main)
