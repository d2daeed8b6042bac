"""The agent checkpoint: the trained actor-critic with the world model it was trained in.

Written by `train-agent` (and by `stages/import_official.py` from official weights), read by
`evaluate`, and by `train-agent --init-agent` to continue training. A dict:
  format, game, seed, num_actions, params (YAML names), actor_critic (weights),
  world_model (the `diamond.world_model.model` checkpoint state), plus what the writer adds
  (the importer adds `imported_from`: the source file and its sha256).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from diamond.config import ConfigError, Params, params_from_dict
from diamond.io import ArtifactError, load_torch

AGENT_CHECKPOINT_FORMAT = "diamond-agent/2"  # /2: the official module tree (docs/official-parity.md)


def agent_checkpoint(
    game: str, seed: int, num_actions: int, params: dict[str, Any], actor_critic: dict[str, Any],
    world_model: dict[str, Any], **extra: Any,
) -> dict[str, Any]:
    return {
        "format": AGENT_CHECKPOINT_FORMAT, "game": game, "seed": seed, "num_actions": num_actions,
        "params": params, "actor_critic": actor_critic, "world_model": world_model, **extra,
    }


def read_agent_checkpoint(path: str | Path, game: str | None) -> dict[str, Any]:
    """Load an agent checkpoint of this code's format for `game` (any game with None), else a one-line error."""
    ckpt = load_torch(path)
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != AGENT_CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{path}: not an agent checkpoint of format {AGENT_CHECKPOINT_FORMAT!r} (found {found!r}); "
            "retrain it with this code, or import official weights with stages.import_official"
        )
    if game is not None and ckpt.get("game") != game:
        raise ArtifactError(f"{path}: agent was trained on {ckpt.get('game')!r}, not --game {game!r}")
    return ckpt


def checkpoint_params(path: str | Path, saved: dict) -> Params:
    """The params an agent checkpoint was written with (to_dict of Params, derived keys included)."""
    data = copy.deepcopy(saved)
    data.get("world_model", {}).get("reward_end", {}).pop("segment_length", None)  # derived, not a key
    try:
        return params_from_dict(data)
    except ConfigError as e:
        raise ArtifactError(f"{path}: its params do not load with this code ({e})") from None
