"""Reward/termination model: classes, recurrence, masking, and that its loss can be driven down."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diamond.config import ConfigError, OptimizerConfig
from diamond.data import Segment
from diamond.models.reward_end import RewardEndModel, class_counts, log_priors, reward_classes
from diamond.training import Trainer


def make_segment(b: int, n: int, seed: int = 0, size: int = 16) -> Segment:
    rng = np.random.default_rng(seed)
    return Segment(
        obs=rng.integers(0, 256, (b, n + 1, 3, size, size), dtype=np.uint8),
        act=rng.integers(0, 3, (b, n)).astype(np.int64),
        rew=rng.choice([-2.0, 0.0, 0.0, 5.0], (b, n)).astype(np.float32),
        terminated=rng.random((b, n)) < 0.2,
        truncated=np.zeros((b, n), bool),
        mask=np.ones((b, n + 1), bool),
    )


def test_reward_classes():
    assert reward_classes(torch.tensor([-3.0, 0.0, 0.5, 10.0])).tolist() == [0, 1, 2, 2]


def test_heads_start_at_the_class_priors(tiny_params):
    rew = np.array([0, 0, 0, 0, 0, 0, 0, 3.0, 1.0, 0], np.float32)  # no negative reward
    terminated = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    reward, end = class_counts(rew, terminated)
    assert reward.tolist() == [0, 8, 2] and end.tolist() == [9, 1]
    model = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16, output_bias=True)
    model.init_heads_to_priors(reward, end)
    # Add-one smoothing: the unseen class gets a finite, small probability.
    bias = model.head[-1].bias
    assert torch.allclose(bias[:3].softmax(0), torch.tensor([1 / 13, 9 / 13, 3 / 13]), atol=1e-6)
    assert torch.allclose(bias[3:].softmax(0), torch.tensor([10 / 12, 2 / 12]), atol=1e-6)
    assert torch.allclose(log_priors(reward).exp().sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="2 reward and 2 termination class counts"):
        model.init_heads_to_priors(end, end)
    official = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16)
    assert official.head[-1].bias is None  # the official head has no output bias
    with pytest.raises(ValueError, match="without output biases"):
        official.init_heads_to_priors(reward, end)


def test_forward_shapes_and_recurrence(tiny_params):
    torch.manual_seed(0)
    model = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16).eval()  # make_segment frames
    seg = make_segment(2, 5).to_torch()
    obs, nxt = seg.obs[:, :-1], seg.obs[:, 1:]
    lr, le, (h, c) = model(obs, seg.act, nxt)
    assert lr.shape == (2, 5, 3) and le.shape == (2, 5, 2)
    assert h.shape == (1, 2, tiny_params.world_model.reward_end.lstm_dim)
    # Step by step with the carried LSTM state gives the same logits as the whole sequence.
    state = None
    for t in range(5):
        lr_t, le_t, state = model(obs[:, t : t + 1], seg.act[:, t : t + 1], nxt[:, t : t + 1], state)
        assert torch.allclose(lr_t[:, 0], lr[:, t], atol=1e-5)
        assert torch.allclose(le_t[:, 0], le[:, t], atol=1e-5)


def test_loss_masks_padding(tiny_params):
    torch.manual_seed(0)
    model = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16)  # make_segment frames
    seg = make_segment(3, 6)
    seg.mask[:, :3] = False  # the first 3 frames (steps 0..2) are padding before the episode start
    loss1, m = model.compute_loss(seg.to_torch())
    seg2 = dataclasses.replace(seg, rew=seg.rew.copy(), terminated=seg.terminated.copy())
    seg2.rew[:, :3] = 7.0
    seg2.terminated[:, :3] = ~seg.terminated[:, :3]
    loss2, _ = model.compute_loss(seg2.to_torch())
    assert loss1.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert set(m) >= {"loss", "loss_rew", "loss_end", "acc_rew", "acc_end"}
    # A fresh model is near-uniform: cross-entropies near log 3 and log 2.
    assert m["loss_rew"] == pytest.approx(np.log(3), abs=0.3)
    assert m["loss_end"] == pytest.approx(np.log(2), abs=0.3)


def test_fits_a_fixed_batch(tiny_params):
    # Labels are a function of the action, so a working model must fit them.
    torch.manual_seed(0)
    model = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16)  # make_segment frames
    trainer = Trainer(model, OptimizerConfig(lr=3e-3, eps=1e-8, weight_decay=0.0, warmup_steps=1, warmup_starts_at_zero=False, max_grad_norm=100.0))
    seg = make_segment(4, 6)
    seg.rew = (seg.act.astype(np.float32) - 1) * 3
    seg.terminated = seg.act == 2
    t = seg.to_torch()
    first = model.compute_loss(t)[1]
    for _ in range(40):
        loss, m = model.compute_loss(t)
        trainer.step(loss)
    assert m["loss"] < first["loss"] / 3
    assert m["acc_rew"] == 1.0 and m["acc_end"] == 1.0


def test_bad_config(tiny_params):
    with pytest.raises(ConfigError, match="depths"):
        RewardEndModel(dataclasses.replace(tiny_params.world_model.reward_end, depths=[1]), num_actions=3, obs_size=32)
    with pytest.raises(ConfigError, match="obs_size=31"):  # 2 levels halve the frame once
        RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=31)


def test_lstm_reads_the_encoder_map_as_is(tiny_params):
    """No resizing before the LSTM: the paper's 4 levels on 64x64 frames end on an 8x8 map of 32
    channels (2,048 LSTM inputs, as in the official code); 32x32 frames end on 4x4 (512)."""
    cfg = dataclasses.replace(tiny_params.world_model.reward_end, channels=[32] * 4, depths=[2] * 4, lstm_dim=512)
    assert RewardEndModel(cfg, num_actions=18, obs_size=64).lstm.input_size == 32 * 8 * 8
    assert RewardEndModel(cfg, num_actions=18, obs_size=32).lstm.input_size == 32 * 4 * 4
    model = RewardEndModel(tiny_params.world_model.reward_end, num_actions=3, obs_size=16).eval()
    seg = make_segment(2, 3, size=16).to_torch()
    assert model.encode(seg.obs[:, :-1].float(), seg.act, seg.obs[:, 1:].float()).shape == (2, 3, 8 * 8 * 8)


def test_world_model_state_of_another_format_is_a_one_line_error(tiny_params):
    """An agent checkpoint embeds the world-model state; one from older code names its format."""
    from diamond.io import ArtifactError
    from diamond.world_model.model import build_world_model, load_world_model, world_model_state

    wm = build_world_model(tiny_params.world_model, 3, tiny_params.env.obs_size, torch.device("cpu"))
    state = world_model_state(wm)
    assert load_world_model("agent.pt", torch.device("cpu"), tiny_params.world_model, state).obs_size == 32
    old = {k: v for k, v in state.items() if k != "obs_size"} | {"format": "diamond-world-model/1"}
    with pytest.raises(ArtifactError, match="agent.pt: .*found 'diamond-world-model/1'.*retrain"):
        load_world_model("agent.pt", torch.device("cpu"), tiny_params.world_model, old)
