"""Import official DIAMOND weights: an official agent state dict -> this project's world-model and
agent checkpoints.

The input is what the official trainer saves (`agent.state_dict()`, keys under `denoiser.`,
`rew_end_model.`, `actor_critic.`) and what the authors released per game on the Hugging Face
Hub (`eloialonso/diamond`, `atari_100k/models/{Game}.pt`). The key map and the strict load are in
`diamond/official.py`. The params must describe the official architecture (configs/paper.yaml).
The world-model checkpoint starts fresh optimiser states; `train-agent --world-model W
--init-agent A` continues training from it, and `evaluate --agent A` scores it.

    python -m stages.import_official --params configs/paper.yaml --game Breakout \\
        --checkpoint pretrained/Breakout.pt --out-world-model runs/Breakout-released/world_model.pt \\
        --out-agent runs/Breakout-released/agent.pt
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import torch

from diamond.agent_checkpoint import agent_checkpoint
from diamond.config import to_dict
from diamond.env import num_actions
from diamond.io import ArtifactError, atomic_save_torch, load_torch
from diamond.models.actor_critic import ActorCritic
from diamond.official import load_official, official_num_actions
from diamond.world_model import build_world_model, save_world_model, world_model_state
from stages.common import base_parser, load_checked_params, run_main
from stages.tracking import stage_run


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = base_parser("Convert an official DIAMOND agent state dict to this project's checkpoints.", per_run=False)
    parser.add_argument("--game", required=True, help="Atari 100k game the weights were trained on, e.g. Breakout")
    parser.add_argument("--seed", type=int, default=0, help="seed recorded in the agent checkpoint (default 0)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="official agent state dict (.pt)")
    parser.add_argument("--out-world-model", required=True, type=Path)
    parser.add_argument("--out-agent", required=True, type=Path)
    args = parser.parse_args()
    p = load_checked_params(args)
    game, n = args.game, num_actions(args.game)
    state = load_torch(args.checkpoint, weights_only=True)
    found = official_num_actions(state, str(args.checkpoint))
    if found != n:
        raise ArtifactError(f"{args.checkpoint}: official agent has {found} actions, {game} has {n}; wrong game?")
    digest = sha256(args.checkpoint)
    source = {"path": str(args.checkpoint), "sha256": digest}
    with stage_run("import-official", sections={"env": p.env, "world_model": p.world_model, "actor_critic": p.actor_critic},
                   game=game, seed=args.seed, inputs=[args.checkpoint]):
        mlflow.set_tag("official_checkpoint_sha256", digest)
        device = torch.device("cpu")
        wm = build_world_model(p.world_model, n, p.env.obs_size, device)
        ac = ActorCritic(p.actor_critic, n, p.env.obs_size)
        load_official(state, wm.denoiser, wm.reward_end, ac, str(args.checkpoint))
        save_world_model(args.out_world_model, wm, extra={"imported_from": source})
        atomic_save_torch(args.out_agent, agent_checkpoint(
            game, args.seed, n, to_dict(p), ac.state_dict(), world_model_state(wm), imported_from=source,
        ))
        counts = {**wm.num_parameters(), "actor_critic": sum(x.numel() for x in ac.parameters())}
        mlflow.log_metrics({f"parameters.{k}": v for k, v in counts.items()})
    print(f"import-official {game}: {args.checkpoint} (sha256 {digest[:12]}) -> {args.out_world_model}, {args.out_agent}; "
          + ", ".join(f"{k} {v:,} parameters" for k, v in counts.items()))


if __name__ == "__main__":
    run_main(main)
