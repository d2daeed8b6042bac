"""The speed switches (channels_last, compile_denoiser): same numbers as the default up to rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from diamond.config import ConfigError, params_from_dict
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer, compile_networks, set_memory_format, set_tf32
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.sampler import DiffusionSampler
from conftest import tiny_params_dict
from test_denoiser import random_segment

NHWC = torch.channels_last


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def assert_train_alike(reference: Denoiser, other: Denoiser, trainers: list[Trainer], steps: int) -> None:
    """Train both on the same data and noise; losses agree to rounding at every step, weights after."""
    n = reference.cfg.training_segment_steps
    for step in range(steps):
        seg = random_segment(4, n, size=16, seed=step).to_torch()
        losses = []
        for model, trainer in zip((reference, other), trainers):
            torch.manual_seed(100 + step)  # the same noise levels and noise in both
            loss, _ = model.compute_loss(seg)
            trainer.step(loss)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(reference.parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_switch_moves_every_conv_weight_and_back(tiny_params):
    models = [
        Denoiser(tiny_params.world_model.denoiser, 4),
        RewardEndModel(tiny_params.world_model.reward_end, 4, tiny_params.env.obs_size),
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
    assert_train_alike(base, nhwc, trainers, steps=3)
    assert any(not torch.equal(a, b) for a, b in zip(before, nhwc.parameters()))
    assert all(w.is_contiguous(memory_format=NHWC) for w in conv_weights(nhwc))


@pytest.mark.slow  # ~50 s: torch.compile of the denoiser's forward and backward on CPU
def test_compiled_denoiser_trains_and_samples_like_eager(tiny_params):
    """compile_denoiser as the stages apply it (after channels_last): the training losses, the
    updated weights and a sampled next frame match eager mode's to rounding, and the state dict
    keeps the eager names, so checkpoints move freely between compiled and eager runs."""
    torch.manual_seed(0)
    eager = Denoiser(tiny_params.world_model.denoiser, 4)
    compiled = copy.deepcopy(eager)
    set_memory_format(True, eager, compiled)
    compile_networks(True, compiled.net)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    opt = tiny_params.world_model.denoiser_optimizer
    assert_train_alike(eager, compiled, [Trainer(eager, opt), Trainer(compiled, opt)], steps=2)

    n = tiny_params.world_model.denoiser.num_conditioning_frames
    seg = random_segment(3, n, size=16, seed=7).to_torch()
    frames = []
    for model in (eager, compiled):
        model.eval()
        sampler = DiffusionSampler(model, tiny_params.world_model.sampler, quantization=model.cfg.quantization)
        with torch.no_grad():
            frames.append(sampler.sample(seg.obs[:, :n], seg.act, generator=torch.Generator().manual_seed(3)))
    # 8-bit quantised frames: rounding may flip a value by one level (2/255) at most.
    assert (frames[1] - frames[0]).abs().max() <= 2 / 255 + 1e-6
    assert (frames[1] != frames[0]).float().mean() < 0.01
    # The compiled code really ran: dynamo compiled the U-Net's forward.
    assert compiled.net._compiled_call_impl is not None


@pytest.mark.parametrize("key", ["channels_last", "compile_denoiser", "reuse_freed_memory", "tf32"])
def test_speed_switches_must_be_bools(key):
    d = tiny_params_dict()
    d[key] = "yes"
    with pytest.raises(ConfigError, match=key):
        params_from_dict(d)


def test_tf32_switch_sets_both_cuda_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for enabled in (True, False):
            set_tf32(enabled)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_restart_rows_keeps_the_running_state_dtype(tiny_params):
    """Under autocast the burn-in may return another dtype; the state keeps its own (issue: bf16 crash)."""
    torch.manual_seed(0)
    ac = ActorCritic(tiny_params.actor_critic, 4, 16)
    state = tuple(x.double() for x in ac.initial_state(3, "cpu"))
    rows = torch.tensor([True, False, True])
    context = torch.rand(3, 3, 3, 16, 16) * 2 - 1  # aligned with the batch (diamond.agent.imagination.Restart)
    h, c = ac.restart_rows(state, rows, context, torch.ones(3, 3, dtype=torch.bool))
    assert h.dtype == c.dtype == torch.float64 and h[0].abs().sum() > 0 and h[1].abs().sum() == 0
