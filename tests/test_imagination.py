"""The imagination environment over a real (tiny, untrained) denoiser and reward/termination model,
started from real Breakout episodes: burn-in, horizon truncation, restarts on termination."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.agent import imagination_loss, real_data_loss
from diamond.collector import Collector, UniformPolicy
from diamond.config import Params, params_from_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.env import make_env, num_actions
from diamond.imagination import ImaginationEnv
from diamond.models.actor_critic import ActorCritic
from diamond.models.denoiser import Denoiser
from diamond.models.reward_end import RewardEndModel
from diamond.sampler import DiffusionSampler

GAME = "Breakout"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EpisodeStore:
    params = params_from_dict(tiny_params_dict())
    s = EpisodeStore(tmp_path_factory.mktemp("data") / "store", GAME, num_actions(GAME))
    env = make_env(GAME, 0, train=True, config=params.env)
    collector = Collector(env, UniformPolicy(num_actions(GAME), np.random.default_rng(0)), s)
    collector.collect(120)
    collector.flush()
    return s


@pytest.fixture
def tiny_params() -> Params:
    """conftest's tiny params with a 4-level U-Net: its middle attention runs at 8x8, not 32x32."""
    d = tiny_params_dict()
    d["world_model"]["denoiser"].update(channels=[16] * 4, depths=[1] * 4, attention=[False] * 4)
    return params_from_dict(d)


def _models(params: Params) -> tuple[Denoiser, RewardEndModel]:
    torch.manual_seed(0)
    wm = params.world_model
    return Denoiser(wm.denoiser, num_actions(GAME)).eval(), RewardEndModel(wm.reward_end, num_actions(GAME), params.env.obs_size, output_bias=True).eval()


def _env(params: Params, store: EpisodeStore, horizon: int, seed: int = 0, batch: int = 3) -> ImaginationEnv:
    denoiser, reward_end = _models(params)
    return ImaginationEnv(
        DiffusionSampler(denoiser, params.world_model.sampler, quantization=params.world_model.denoiser.quantization), reward_end,
        SegmentSampler(store, np.random.default_rng(seed)), params.world_model.denoiser.num_conditioning_frames,
        batch_size=batch, horizon=horizon, device=torch.device("cpu"),
    )


def _force_end(model: RewardEndModel, end: bool) -> None:
    """Make the termination head certain: always (end=True) or never end."""
    last = model.head[-1]  # outputs: 3 reward logits, then 2 termination logits
    with torch.no_grad():
        last.weight[-2:].zero_()
        last.bias[-2:].copy_(torch.tensor([-30.0, 30.0] if end else [30.0, -30.0]))


def _is_real_frame(x: torch.Tensor, store: EpisodeStore) -> bool:
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    return any((ep.obs == u8).all(axis=(1, 2, 3)).any() for ep in (store[i] for i in range(len(store))))


def test_reset_burns_in_the_reward_model_on_the_real_context(tiny_params: Params, store: EpisodeStore) -> None:
    env = _env(tiny_params, store, horizon=5)
    obs, start = env.reset()
    L = tiny_params.world_model.denoiser.num_conditioning_frames
    # The same segments, drawn again from an identically seeded sampler.
    seg = SegmentSampler(store, np.random.default_rng(0)).sample(3, L - 1).to_torch("cpu")
    frames = seg.obs * seg.mask[:, :, None, None, None]
    torch.testing.assert_close(obs, frames[:, -1])
    torch.testing.assert_close(start.context_obs, frames[:, :-1])
    size = tiny_params.env.obs_size
    assert start.context_obs.shape == (3, L - 1, 3, size, size) and start.rows.all()
    with torch.no_grad():
        _, _, expected = env.reward_end(frames[:, :-1], seg.act, frames[:, 1:])
    torch.testing.assert_close(env.reward_state[0], expected[0])
    torch.testing.assert_close(env.reward_state[1], expected[1])
    assert env.act_buffer[:, :-1].equal(seg.act)


def test_truncates_at_the_horizon_and_restarts(tiny_params: Params, store: EpisodeStore) -> None:
    env = _env(tiny_params, store, horizon=3)
    _force_end(env.reward_end, end=False)
    env.reset()
    for t in range(1, 7):
        step = env.step(torch.zeros(3, dtype=torch.long))
        assert not step.terminated.any()
        assert step.truncated.all() == (t % 3 == 0) and step.truncated.any() == (t % 3 == 0)
        assert set(step.reward.tolist()) <= {-1.0, 0.0, 1.0}
        if t % 3 == 0:
            assert step.restart.rows.all() and step.restart.context_obs.shape[0] == 3
            # Restarted rows act on a real frame from the dataset; final_obs is the imagined one.
            assert all(_is_real_frame(step.obs[b], store) for b in range(3))
            assert not torch.equal(step.obs, step.final_obs)
        else:
            assert not step.restart.rows.any() and step.restart.context_obs.shape[0] == 0
            torch.testing.assert_close(step.obs, step.final_obs)
    assert env.steps.tolist() == [0, 0, 0]


def test_termination_restarts_only_the_ended_rows(tiny_params: Params, store: EpisodeStore) -> None:
    env = _env(tiny_params, store, horizon=10)
    _force_end(env.reward_end, end=True)
    env.reset()
    step = env.step(torch.ones(3, dtype=torch.long))
    assert step.terminated.all() and not step.truncated.any() and step.restart.rows.all()
    assert env.steps.tolist() == [0, 0, 0]
    # The generated frame, not the restart, is the conditioning that was replaced.
    L = tiny_params.world_model.denoiser.num_conditioning_frames
    torch.testing.assert_close(env.obs_buffer[:, -1], step.obs)
    assert env.obs_buffer.shape[1] == L


def test_imagination_loss_trains_the_actor_critic(tiny_params: Params, store: EpisodeStore) -> None:
    env = _env(tiny_params, store, horizon=tiny_params.actor_critic.horizon, batch=tiny_params.actor_critic.batch_size)
    torch.manual_seed(1)
    ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    loss, metrics = imagination_loss(ac, env, tiny_params.actor_critic)
    loss.backward()
    # Zero-initialised heads: the first gradient reaches the value head (value loss) at least.
    assert ac.critic.weight.grad is not None and ac.critic.bias.grad.abs().sum() > 0
    assert np.isfinite(list(metrics.values())).all()
    assert metrics["entropy"] == pytest.approx(np.log(num_actions(GAME)), rel=1e-4)


def test_model_free_loss_uses_real_segments(tiny_params: Params, store: EpisodeStore) -> None:
    """The ablation's loss on real data: finite, differentiable, masked on padding."""
    torch.manual_seed(2)
    ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
    with torch.no_grad():
        ac.critic.bias.fill_(1.0)  # V = 1 everywhere: bootstrapped returns differ from it by (1 - gamma)-ish
    segments = SegmentSampler(store, np.random.default_rng(0))
    context = tiny_params.world_model.denoiser.num_conditioning_frames
    loss, metrics = real_data_loss(ac, segments, tiny_params.actor_critic, context, torch.device("cpu"))
    loss.backward()
    assert ac.critic.bias.grad is not None and ac.critic.bias.grad.abs().sum() > 0
    assert np.isfinite(list(metrics.values())).all()
    assert metrics["value_mean"] == pytest.approx(1.0) and metrics["loss_value"] > 0.0
