"""Import official DIAMOND weights: an official agent state dict -> this project's world-model and
agent checkpoints.

The input is what the official trainer saves (`agent.state_dict()`, keys under `denoiser.`,
`rew_end_model.`, `actor_critic.`) and what the authors released per game on the Hugging Face
Hub (`eloialonso/diamond`, `atari_100k/models/{Game}.pt`). The key map and the strict load are in
`diamond/official/keymap.py`. The params must describe the official architecture (configs/paper.yaml).
The world-model checkpoint starts fresh optimiser states; `train-agent --world-model W
--init-agent A` continues training from it, and `evaluate --agent A` scores it.

    python -m stages.import_official --params configs/paper.yaml --game Breakout \\
        --checkpoint pretrained/Breakout.pt --out-world-model runs/Breakout-released/world_model.pt \\
        --out-agent runs/Breakout-released/agent.pt
"""

from __future__ import annotations

from pathlib import Path

import torch

from diamond.agent.checkpoint import agent_checkpoint
from diamond.config import Params, to_dict
from diamond.env.atari import check_game, num_actions
from diamond.io import ArtifactError, atomic_save_torch, load_torch
from diamond.models.actor_critic import ActorCritic
from diamond.official.keymap import load_official, official_num_actions
from diamond.official.released import sha256_file
from diamond.world_model.model import build_world_model, save_world_model, world_model_state
from stages import tracking
from stages.common import base_parser, load_checked_params, run_main
from stages.tracking import stage_run


def read_official(checkpoint: Path, game: str) -> dict:
    """The official state dict in `checkpoint`, checked to be an agent for `game` (one-line errors)."""
    state = load_torch(checkpoint, weights_only=True)
    found, n = official_num_actions(state, str(checkpoint)), num_actions(game)
    if found != n:
        raise ArtifactError(f"{checkpoint}: official agent has {found} actions, {game} has {n}; wrong game?")
    return state


def convert(p: Params, game: str, seed: int, state: dict, out_world_model: Path, out_agent: Path,
            source: dict[str, str]) -> dict[str, int]:
    """Load an official state dict strictly into our networks and write our two checkpoints (atomically).

    `source` (path, sha256, ...) is stored in both checkpoints as `imported_from`. Returns the
    parameter count of each network."""
    n = num_actions(game)
    device = torch.device("cpu")
    wm = build_world_model(p.world_model, n, p.env.obs_size, device)
    ac = ActorCritic(p.actor_critic, n, p.env.obs_size)
    load_official(state, wm.denoiser, wm.reward_end, ac, source["path"])
    save_world_model(out_world_model, wm, extra={"imported_from": source})
    atomic_save_torch(out_agent, agent_checkpoint(
        game, seed, n, to_dict(p), ac.state_dict(), world_model_state(wm), imported_from=source,
    ))
    return {**wm.num_parameters(), "actor_critic": sum(x.numel() for x in ac.parameters())}


def main() -> None:
    parser = base_parser("Convert an official DIAMOND agent state dict to this project's checkpoints.", per_run=False)
    parser.add_argument("--game", required=True, help="Atari 100k game the weights were trained on, e.g. Breakout")
    parser.add_argument("--seed", type=int, default=0, help="seed recorded in the agent checkpoint (default 0)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="official agent state dict (.pt)")
    parser.add_argument("--out-world-model", required=True, type=Path)
    parser.add_argument("--out-agent", required=True, type=Path)
    args = parser.parse_args()
    p = load_checked_params(args)
    check_game(args.game)
    state = read_official(args.checkpoint, args.game)
    digest = sha256_file(args.checkpoint)
    source = {"path": str(args.checkpoint), "sha256": digest}
    with stage_run("import-official", sections={"env": p.env, "world_model": p.world_model, "actor_critic": p.actor_critic},
                   game=args.game, seed=args.seed, inputs=[args.checkpoint], job_dir=args.out_agent.parent):
        tracking.set_tag("official_checkpoint_sha256", digest)
        counts = convert(p, args.game, args.seed, state, args.out_world_model, args.out_agent, source)
        tracking.log_metrics({f"parameters.{k}": v for k, v in counts.items()})
    print(f"import-official {args.game}: {args.checkpoint} (sha256 {digest[:12]}) -> {args.out_world_model}, {args.out_agent}; "
          + parameter_summary(counts))


def parameter_summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,} parameters" for k, v in counts.items())


if __name__ == "__main__":
    run_main(main)
