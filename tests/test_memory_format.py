"""The channels_last switch: NHWC weights, same numbers as the default layout up to rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from diamond.config import ConfigError, params_from_dict
from diamond.models.actor_critic import ActorCritic
from diamond.models.denoiser import Denoiser
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer, set_memory_format
from conftest import tiny_params_dict
from test_denoiser import random_segment

NHWC = torch.channels_last


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_switch_moves_every_conv_weight_and_back(tiny_params):
    models = [
        Denoiser(tiny_params.world_model.denoiser, 4),
        RewardEndModel(tiny_params.world_model.reward_end, 4),
        ActorCritic(tiny_params.actor_critic, 4, tiny_params.env.obs_size),
    ]
    for model in models:
        weights = conv_weights(model)
        assert weights and not any(w.is_contiguous(memory_format=NHWC) for w in weights if w.shape[-1] > 1)
        set_memory_format(True, model)
        assert all(w.is_contiguous(memory_format=NHWC) for w in conv_weights(model))
        set_memory_format(False, model)
        assert all(w.is_contiguous() for w in conv_weights(model))


def test_channels_last_training_matches_default_layout(tiny_params):
    """Same init, data and noise: losses and weights after a few AdamW steps agree to rounding;
    the trainer built before the move keeps updating the moved parameters."""
    torch.manual_seed(0)
    base = Denoiser(tiny_params.world_model.denoiser, 4)
    nhwc = copy.deepcopy(base)
    trainers = [Trainer(base, tiny_params.world_model.denoiser_optimizer), Trainer(nhwc, tiny_params.world_model.denoiser_optimizer)]
    set_memory_format(True, nhwc)  # after the optimiser was built, as the stages do on resume
    before = [p.detach().clone() for p in nhwc.parameters()]
    n = tiny_params.world_model.denoiser.num_conditioning_frames
    for step in range(3):
        seg = random_segment(4, n, size=16, seed=step).to_torch()
        losses = []
        for model, trainer in zip((base, nhwc), trainers):
            torch.manual_seed(100 + step)  # the same noise levels and noise in both
            loss, _ = model.compute_loss(seg)
            trainer.step(loss)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, nhwc.parameters()))
    for a, b in zip(base.parameters(), nhwc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert all(w.is_contiguous(memory_format=NHWC) for w in conv_weights(nhwc))


def test_channels_last_must_be_a_bool():
    d = tiny_params_dict()
    d["channels_last"] = "yes"
    with pytest.raises(ConfigError, match="channels_last"):
        params_from_dict(d)
