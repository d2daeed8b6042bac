"""Play and watch inside the world model, in a browser (not a pipeline stage: an entry point).

The authors' `python src/play.py` opens a pygame window; this serves the same play mode as one
local web page (diamond/play/session.py, diamond/play/server.py), so it also runs on a remote machine
through an SSH tunnel, with no display:

    python -m stages.play --agent runs/Breakout-0/agent.pt
    python -m stages.play --agent runs/released/Breakout/agent.pt      # stages.import_released
    python -m stages.play --world-model runs/Breakout-0/world_model.pt --game Breakout   # a person plays
    python -m stages.play --agent runs/Breakout-0/agent.pt --dataset runs/Breakout-0/dataset --record-dir runs/play

It prints the URL (127.0.0.1 and a free port unless --host/--port) and serves until Ctrl-C.
--benchmark N plays N steps as fast as possible, prints the rate and exits (README figures).
"""

from __future__ import annotations

import argparse
import errno
import time
from pathlib import Path

import torch

from diamond.agent.checkpoint import AGENT_CHECKPOINT_FORMAT, checkpoint_params
from diamond.config import ConfigError, Params, load_params
from diamond.data import EpisodeStore
from diamond.env.atari import check_game, num_actions
from diamond.io import ArtifactError, load_torch
from diamond.models.actor_critic import ActorCritic
from diamond.play.server import PlayServer
from diamond.play.session import PlaySession, PlaySettings
from diamond.training import apply_speed_switches
from diamond.world_model.model import WorldModel, load_world_model
from stages.common import run_main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Play and watch inside the world model, in a browser.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--agent", type=Path, help="agent checkpoint (train-agent, import-official, import-released)")
    src.add_argument("--world-model", type=Path, help="world-model checkpoint alone: a person plays")
    src.add_argument("--random-weights", metavar="PARAMS", type=Path,
                     help="a fresh world model and agent of this params file, whose R never predicts an end "
                          "(speed measurements: an untrained R would end every other step)")
    p.add_argument("--game", help="game of a --world-model or --random-weights (an agent checkpoint names its own)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="env section for --world-model (default params.yaml); an agent checkpoint carries its own")
    p.add_argument("--dataset", type=Path, help="an episode store to replay (dataset mode)")
    p.add_argument("--record-dir", type=Path, help="where recorded episodes go (one episode store per record name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starts and of the world model's sampling")
    p.add_argument("--fps", type=float, default=15.0, help="target frame rate (0: as fast as possible)")
    p.add_argument("--paused", action="store_true", help="start paused")
    p.add_argument("--denoising-steps", type=int, help="the sampler's steps to start with (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--benchmark", type=int, metavar="STEPS", help="play STEPS steps at full speed, print the rate, exit")
    return p.parse_args()


def game_of(args: argparse.Namespace, found: str | None) -> str:
    game = found or args.game
    if game is None:
        raise ConfigError("--game: needed with --world-model or --random-weights")
    if found is not None and args.game is not None and args.game != found:
        raise ArtifactError(f"{args.agent}: agent was trained on {found!r}, not --game {args.game!r}")
    check_game(game)
    return game


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[str, Params, WorldModel, ActorCritic | None]:
    """The game, params, world model and (with --agent) actor-critic of the command line."""
    if args.random_weights is not None:
        p = load_params(args.random_weights)
        game = game_of(args, None)
        from diamond.world_model.model import build_world_model

        torch.manual_seed(args.seed)
        wm = build_world_model(p.world_model, num_actions(game), p.env.obs_size, device)
        ac = ActorCritic(p.actor_critic, num_actions(game), p.env.obs_size).to(device)
        # An untrained R ends every other step, a trained one rarely: here it predicts reward 0
        # and no end (logits: reward -1, 0, 1, then not-ended, ended), so steps are timed, not resets.
        head = torch.nn.Linear(wm.reward_end.head[-1].in_features, 5).to(device)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 30.0, 0.0, 30.0, 0.0]))
        wm.reward_end.head[-1] = head
    elif args.agent is not None:
        ckpt = load_torch(args.agent)
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        if found != AGENT_CHECKPOINT_FORMAT:
            raise ArtifactError(f"{args.agent}: not an agent checkpoint of format {AGENT_CHECKPOINT_FORMAT!r} (found {found!r})")
        game = game_of(args, ckpt["game"])
        p = checkpoint_params(args.agent, ckpt["params"])
        wm = load_world_model(args.agent, device, ckpt=ckpt["world_model"])
        ac = ActorCritic(p.actor_critic, int(ckpt["num_actions"]), p.env.obs_size).to(device)
        ac.load_state_dict(ckpt["actor_critic"])
    else:
        p = load_params(args.params)
        game = game_of(args, None)
        wm = load_world_model(args.world_model, device)
        ac = None
        if wm.num_actions != num_actions(game) or wm.obs_size != p.env.obs_size:
            raise ArtifactError(f"{args.world_model}: {wm.num_actions} actions, {wm.obs_size} px frames; "
                                f"{game} has {num_actions(game)} actions and {args.params} env.obs_size is {p.env.obs_size}")
    apply_speed_switches(p, tuple(m for m in (wm.denoiser, wm.reward_end, ac) if m is not None), None)
    for m in (wm.denoiser, wm.reward_end, ac):
        if m is not None:
            m.eval()
    return game, p, wm, ac


def benchmark(session: PlaySession, steps: int) -> None:
    session.step()  # first call: allocations and lazy initialisation, not counted
    began = time.perf_counter()
    for _ in range(steps):
        session.step()
    rate = steps / (time.perf_counter() - began)
    s = session.settings
    print(f"{session.game} {s.mode}, controller {s.controller}, {s.denoising_steps} denoising steps "
          f"({', '.join(session.formulations())}): {rate:.1f} steps/s over {steps} steps, "
          f"{torch.get_num_threads()} torch threads")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    game, p, wm, ac = load_models(args, device)
    if args.dataset is not None and not (args.dataset / "manifest.json").is_file():
        raise ArtifactError(f"{args.dataset}: no episode store here (no manifest.json)")
    dataset = EpisodeStore(args.dataset, game=game) if args.dataset is not None else None
    settings = PlaySettings(mode="world_model", controller="agent" if ac is not None else "human",
                            paused=args.paused, fps=args.fps)
    session = PlaySession(game, p.env, wm, ac, device, seed=args.seed, dataset=dataset, record_dir=args.record_dir,
                          settings=settings)
    if args.denoising_steps is not None:
        try:
            session.update({"denoising_steps": args.denoising_steps})
        except ValueError as e:
            raise ConfigError(f"--denoising-steps: {e}") from None
    if args.benchmark:
        return benchmark(session, args.benchmark)
    try:
        server = PlayServer(args.host, args.port, session)
    except OSError as e:
        why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen ({why})") from None
    server.start()
    print(f"play {game}: open {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    run_main(main)
