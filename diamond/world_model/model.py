"""The world model as one object and one checkpoint: denoiser D, reward/termination model R,
their optimisers and step counters (the `train-world-model` stage writes it, `train-agent` and
`evaluate` read it).

Checkpoint contents (a dict, written atomically by `save_world_model`):
  format, num_actions, obs_size, config (the world_model section, YAML names), architecture_hash,
  denoiser, reward_end (model weights), denoiser_trainer, reward_end_trainer (AdamW state and
  step count), plus whatever `extra` the caller adds (the stage adds resume_key, torch and numpy
  random states and the loss curve, so that a resumed run continues exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diamond.config import ConfigError, WorldModelConfig, _build, params_hash, to_dict
from diamond.io import ArtifactError, atomic_save_torch, load_torch
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer
from diamond.world_model.ddpm import DDPMSampler
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.sampler import DiffusionSampler

CHECKPOINT_FORMAT = "diamond-world-model/3"  # /3: the official module tree (docs/official-parity.md)


@dataclass
class WorldModel:
    cfg: WorldModelConfig
    num_actions: int
    obs_size: int
    denoiser: Denoiser
    reward_end: RewardEndModel
    denoiser_trainer: Trainer
    reward_end_trainer: Trainer

    @property
    def sampler(self) -> DiffusionSampler | DDPMSampler:
        return make_sampler(self.denoiser, self.cfg)

    @property
    def denoiser_steps(self) -> int:
        return self.denoiser_trainer.num_steps

    @property
    def reward_end_steps(self) -> int:
        return self.reward_end_trainer.num_steps

    def num_parameters(self) -> dict[str, int]:
        return {
            "denoiser": sum(p.numel() for p in self.denoiser.parameters()),
            "reward_end": sum(p.numel() for p in self.reward_end.parameters()),
        }


def make_sampler(denoiser: Denoiser, cfg: WorldModelConfig) -> DiffusionSampler | DDPMSampler:
    """The denoiser's sampler: EDM's ODE solver, or the official ddpm branch's DDPM sampler."""
    kind = DiffusionSampler if cfg.denoiser.formulation == "edm" else DDPMSampler
    return kind(denoiser, cfg.sampler, quantization=cfg.denoiser.quantization)


def architecture_hash(cfg: WorldModelConfig) -> str:
    """What the weights' shapes and meaning depend on: the denoiser and reward model configs, and
    whether R's last layer has a bias (only with reward_end_prior_init)."""
    return params_hash(cfg.denoiser) + params_hash(cfg.reward_end) + ("+bias" if cfg.reward_end_prior_init else "")


def build_world_model(cfg: WorldModelConfig, num_actions: int, obs_size: int, device: torch.device) -> WorldModel:
    """Fresh models and optimisers for obs_size x obs_size frames (the caller seeds torch for a
    reproducible init)."""
    if num_actions < 1:
        raise ConfigError(f"num_actions: {num_actions} must be >= 1")
    denoiser = Denoiser(cfg.denoiser, num_actions).to(device)
    reward_end = RewardEndModel(cfg.reward_end, num_actions, obs_size, output_bias=cfg.reward_end_prior_init).to(device)
    return WorldModel(
        cfg=cfg,
        num_actions=num_actions,
        obs_size=obs_size,
        denoiser=denoiser,
        reward_end=reward_end,
        denoiser_trainer=Trainer(denoiser, cfg.denoiser_optimizer),
        reward_end_trainer=Trainer(reward_end, cfg.reward_end_optimizer),
    )


def world_model_state(wm: WorldModel) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "num_actions": wm.num_actions,
        "obs_size": wm.obs_size,
        "config": to_dict(wm.cfg),
        "architecture_hash": architecture_hash(wm.cfg),
        "denoiser": wm.denoiser.state_dict(),
        "reward_end": wm.reward_end.state_dict(),
        "denoiser_trainer": wm.denoiser_trainer.state_dict(),
        "reward_end_trainer": wm.reward_end_trainer.state_dict(),
    }


def save_world_model(path: str | Path, wm: WorldModel, extra: dict[str, Any] | None = None) -> None:
    atomic_save_torch(path, {**world_model_state(wm), **(extra or {})})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the format of a world-model checkpoint (tensors on CPU)."""
    return check_format(path, load_torch(path))


def check_format(path: str | Path, ckpt: Any) -> dict[str, Any]:
    """`ckpt` itself, if it is a world-model state this code reads (else a one-line error)."""
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{path}: not a world-model checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r}); "
            "retrain it with this code"
        )
    return ckpt


def load_world_model(
    path: str | Path,
    device: torch.device,
    cfg: WorldModelConfig | None = None,
    ckpt: dict[str, Any] | None = None,
) -> WorldModel:
    """Rebuild the world model saved at `path`, optimiser states and step counters included.

    With `cfg`, its denoiser and reward_end sections must match the checkpoint's (optimiser and
    step settings may differ: the caller's are used); without, the checkpoint's config is used.
    """
    ckpt = read_checkpoint(path) if ckpt is None else check_format(path, ckpt)
    if cfg is None:
        cfg = _build(WorldModelConfig, ckpt["config"], "world_model")
    elif architecture_hash(cfg) != ckpt["architecture_hash"]:
        raise ArtifactError(
            f"{path}: built with a different world_model.denoiser/reward_end config than the params "
            "given; retrain the world model or use the params it was trained with"
        )
    wm = build_world_model(cfg, int(ckpt["num_actions"]), int(ckpt["obs_size"]), device)
    wm.denoiser.load_state_dict(ckpt["denoiser"])
    wm.reward_end.load_state_dict(ckpt["reward_end"])
    wm.denoiser_trainer.load_state_dict(ckpt["denoiser_trainer"])
    wm.reward_end_trainer.load_state_dict(ckpt["reward_end_trainer"])
    return wm
