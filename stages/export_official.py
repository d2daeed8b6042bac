"""Export one of our agents to the official DIAMOND format: agent.pt -> an official `Agent` state dict.

The output is what the official trainer saves (`Agent.state_dict()`, `src/trainer.py:416`) and
what `Agent.load` (`src/agent.py:48-62`) reads: the trainer's `initialization.path_to_ckpt`,
`src/play.py` as the last `checkpoints/agent_versions/agent_epoch_*.pt`. `--out-config` also
writes the matching official agent config (the layout of `config/agent/default.yaml`). The
inverse of stages.import_official; the key map is in `diamond/official/keymap.py` and
`diamond/official/export.py`.

    python -m stages.export_official --agent runs/Breakout-0/agent.pt --out Breakout.pt \\
        --out-config Breakout_agent.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from diamond.agent.checkpoint import checkpoint_params, read_agent_checkpoint
from diamond.io import atomic_save_torch, atomic_write_bytes
from diamond.models.actor_critic import ActorCritic
from diamond.official.export import check_expressible, official_agent_config, to_official
from diamond.official.keymap import load_strict
from diamond.official.released import sha256_file
from diamond.world_model.model import load_world_model
from stages.common import run_main


def export(agent: Path, out: Path, out_config: Path | None) -> str:
    """Write the official state dict of `agent` to `out` (and its agent config to `out_config`);
    returns a one-line summary. Our networks are rebuilt and loaded strictly first, so the
    export holds exactly the tensors of our module tree."""
    ckpt = read_agent_checkpoint(agent, None)
    p = checkpoint_params(agent, ckpt["params"])
    wm = load_world_model(agent, torch.device("cpu"), ckpt=ckpt["world_model"])
    check_expressible(wm.cfg, p.actor_critic, str(agent))
    ac = ActorCritic(p.actor_critic, int(ckpt["num_actions"]), p.env.obs_size)
    load_strict(ac, ckpt["actor_critic"], "actor_critic", str(agent))
    state = to_official({"denoiser": wm.denoiser.state_dict(), "reward_end": wm.reward_end.state_dict(),
                         "actor_critic": ac.state_dict()})
    atomic_save_torch(out, state)  # a temporary name, renamed when complete
    if out_config is not None:
        atomic_write_bytes(out_config, yaml.safe_dump(official_agent_config(p), sort_keys=False).encode())
    return (f"export-official {ckpt['game']}: {agent} -> {out} ({len(state)} tensors, "
            f"{ckpt['num_actions']} actions, sha256 {sha256_file(out)[:12]})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write an agent checkpoint as an official DIAMOND agent state dict.")
    parser.add_argument("--agent", required=True, type=Path, help="agent checkpoint (train-agent, import-official)")
    parser.add_argument("--out", required=True, type=Path, help="official state dict to write (.pt)")
    parser.add_argument("--out-config", type=Path, help="also write the official agent config (YAML) here")
    args = parser.parse_args()
    print(export(args.agent, args.out, args.out_config))


if __name__ == "__main__":
    run_main(main)
