"""Stage evaluate: the final score of one run, and the final world model's fidelity.

The final policy plays `evaluate.episodes` test episodes (no life-loss termination, epsilon
`evaluate.epsilon`) in the real game; the per-episode returns, their mean and the
human-normalized score go to --out-score (the file `aggregate` reads). The world-model
fidelity metrics are measured again on the final world model (--out-fidelity), and
--out-media gets a GIF of the agent in the real game, one of the agent in imagination and the
real-vs-imagined GIF of the fidelity measurement.

    python -m stages.evaluate --params params.yaml --game Breakout --seed 0 \
        --agent runs/Breakout-0/agent.pt --dataset runs/Breakout-0/dataset \
        --out-score runs/Breakout-0/score.json --out-fidelity runs/Breakout-0/evaluate_fidelity.json \
        --out-media runs/Breakout-0/evaluate_media

The test episodes run `evaluate.num_envs` at a time (diamond.agent.evaluation.agent_test_returns).
For an imported agent (stages.import_official, stages.import_released) there is no dataset:
without --dataset the imagination GIF starts from the held-out real episodes of the fidelity
measurement. --released scores the agent under `released.method_name` and `released.seed`
(the authors' released agents; dvc.yaml's evaluate-released stages).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from diamond.agent.checkpoint import read_agent_checkpoint
from diamond.agent.evaluation import agent_test_returns, imagined_frames
from diamond.agent.imagination import ImaginationEnv
from diamond.data import Episode, EpisodeStore, SegmentSampler
from diamond.data.frames import write_gif
from diamond.env.atari import num_actions
from diamond.io import atomic_write_json
from diamond.models.actor_critic import ActorCritic
from diamond.results.scores import score_record
from diamond.seeds import EVALUATE_IMAGINATION, EVALUATE_TEST_EPISODES, derived_seed
from diamond.training import apply_speed_switches
from diamond.world_model.fidelity import heldout_episodes, measure_fidelity, summary_metrics
from diamond.world_model.model import load_world_model
from stages import tracking
from stages.common import base_parser, forget_provenance, load_checked_params, run_main, stage_sections
from stages.compute import compute_setup
from stages.tracking import stage_run

@contextmanager
def starts_store(store: EpisodeStore | None, episodes: list[Episode], game: str) -> Iterator[EpisodeStore]:
    """The store imagination starts from: the run's dataset, else a temporary one of `episodes`."""
    if store is not None:
        yield store
        return
    with tempfile.TemporaryDirectory(prefix="diamond-starts-") as tmp:
        starts = EpisodeStore(Path(tmp) / "episodes", game=game, num_actions=num_actions(game))
        for ep in episodes:
            starts.append(ep)
        yield starts


def main() -> None:
    parser = base_parser("Score the final agent in the real game; world-model fidelity; GIFs.")
    parser.add_argument("--agent", required=True, type=Path, help="agent checkpoint (stage train-agent)")
    parser.add_argument("--dataset", type=Path, help="final dataset (imagination starts); default: the held-out episodes")
    parser.add_argument("--released", action="store_true", help="score under released.method_name (the authors' agents)")
    parser.add_argument("--out-score", required=True, type=Path)
    parser.add_argument("--out-fidelity", required=True, type=Path)
    parser.add_argument("--out-media", required=True, type=Path)
    args = parser.parse_args()
    p = load_checked_params(args)
    forget_provenance(args.out_score.parent, "evaluate-released" if args.released else "evaluate")
    device, memory_tags = compute_setup(p)
    game, seed, ev = args.game, args.seed, p.evaluate
    method = p.released.method_name if args.released else p.aggregate.method_name
    agent = read_agent_checkpoint(args.agent, game)
    store = EpisodeStore(args.dataset, game=game) if args.dataset else None

    sections = stage_sections(p, "evaluate-released" if args.released else "evaluate")
    with stage_run("evaluate", sections=sections, game=game, seed=seed, inputs=[a for a in (args.agent, args.dataset) if a],
                   job_dir=args.out_score.parent):
        tracking.set_tags(memory_tags)
        if "imported_from" in agent:
            tracking.set_tags({f"imported_from.{k}": v for k, v in agent["imported_from"].items()})
        torch.manual_seed(derived_seed(seed, EVALUATE_IMAGINATION))
        ac = ActorCritic(p.actor_critic, num_actions(game), p.env.obs_size).to(device)
        ac.load_state_dict(agent["actor_critic"])
        ac.eval()
        wm = load_world_model(args.agent, device, cfg=p.world_model, ckpt=agent["world_model"])
        apply_speed_switches(p, (wm.denoiser, wm.reward_end, ac), wm.denoiser.net)
        wm.denoiser.eval()
        wm.reward_end.eval()

        # Score: test episodes in the real game; the first one is also filmed.
        returns, film = agent_test_returns(game, derived_seed(seed, EVALUATE_TEST_EPISODES), p.env, ac, ev.epsilon,
                                           ev.episodes, ev.num_envs, device, film_frames=ev.gif_frames)
        score = score_record(game, seed, returns, method)
        if "imported_from" in agent:
            score["imported_from"] = agent["imported_from"]
        atomic_write_json(args.out_score, score)
        media = args.out_media
        media.mkdir(parents=True, exist_ok=True)
        write_gif(media / "agent_real.gif", film)

        context = p.world_model.denoiser.num_conditioning_frames
        episodes = heldout_episodes(game, seed, p.env, ev.fidelity_episodes)
        with starts_store(store, episodes, game) as starts:
            # The agent in imagination, started from the final dataset (or the held-out episodes).
            dream = ImaginationEnv(wm.sampler, wm.reward_end, SegmentSampler(starts, np.random.default_rng(derived_seed(seed, EVALUATE_IMAGINATION))),
                                   context, batch_size=1, horizon=ev.gif_frames, device=device)
            write_gif(media / "agent_imagination.gif", imagined_frames(ac, dream, ev.gif_frames))

        # World-model fidelity of the final world model on held-out real episodes.
        fidelity = measure_fidelity(wm.sampler, wm.reward_end, episodes, context, ev.fidelity_horizons,
                                    p.world_model.reward_end.segment_length, ev.gif_frames,
                                    media / "world_model_real_vs_imagined.gif", device, seed)
        atomic_write_json(args.out_fidelity, fidelity)

        tracking.log_metrics({"mean_return": score["mean_return"], "human_normalized_score": score["human_normalized_score"],
                            "return_std": float(np.std(returns))})
        for i, r in enumerate(returns):
            tracking.log_metric("episode_return", r, step=i)
        tracking.log_metrics({k.replace("/", "."): v for k, v in summary_metrics(fidelity).items()})
        tracking.log_artifact(str(args.out_score))
        tracking.log_artifact(str(args.out_fidelity))
        tracking.log_artifacts(str(media), artifact_path="media")
        print(f"evaluate {game}-{seed}: mean return {score['mean_return']:.2f} over {len(returns)} episodes, "
              f"HNS {score['human_normalized_score']:.3f} -> {args.out_score}")


if __name__ == "__main__":
    run_main(main)
