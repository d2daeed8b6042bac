"""The imagination environment over a real (tiny, untrained) denoiser and reward/termination model,
started from real Breakout episodes: burn-in, horizon truncation, restarts on termination."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.agent.imagination import ImaginationEnv, ImaginedStep, Restart
from diamond.agent.policy import compiled_forward, imagination_loss, real_data_loss
from diamond.config import Params, params_from_dict
from diamond.data import EpisodeStore, SegmentSampler
from diamond.env.atari import make_env, num_actions
from diamond.env.collector import Collector, UniformPolicy
from diamond.models.actor_critic import ActorCritic
from diamond.models.reward_end import RewardEndModel
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.sampler import DiffusionSampler

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


class GatheringImaginationEnv(ImaginationEnv):
    """The step as it was before static shapes (commit b0e21e5): the n ended rows' starts drawn on
    the device, R warmed on those n rows, and everything written back by row index."""

    @torch.no_grad()
    def step(self, action: torch.Tensor) -> ImaginedStep:
        self.act_buffer[:, -1] = action
        next_obs = self.sampler.sample(self.obs_buffer, self.act_buffer)
        logits_rew, logits_end, self.reward_state = self.reward_end(
            self.obs_buffer[:, -1:], action[:, None], next_obs[:, None], self.reward_state)
        reward = torch.distributions.Categorical(logits=logits_rew[:, 0]).sample().float() - 1.0
        terminated = torch.distributions.Categorical(logits=logits_end[:, 0]).sample().bool()
        self.steps += 1
        truncated = (self.steps >= self.horizon) & ~terminated
        self.obs_buffer = torch.cat([self.obs_buffer[:, 1:], next_obs[:, None]], dim=1)
        self.act_buffer = torch.cat([self.act_buffer[:, 1:], torch.zeros_like(self.act_buffer[:, :1])], dim=1)
        obs = next_obs.clone()
        ended = terminated | truncated
        n = int(ended.sum())
        context_obs = next_obs.new_zeros((n, self.context - 1, *next_obs.shape[1:]))
        context_mask = torch.zeros(n, self.context - 1, dtype=torch.bool)
        if n:
            new_obs, new_act, new_mask, new_state = self._start(n)
            self.obs_buffer[ended] = new_obs
            self.act_buffer[ended, :-1] = new_act
            self.act_buffer[ended, -1] = 0
            index = ended.nonzero().squeeze(-1)
            self.reward_state = tuple(s.clone().index_copy_(1, index, p) for s, p in zip(self.reward_state, new_state))
            self.steps[ended] = 0
            obs[ended] = new_obs[:, -1]
            context_obs, context_mask = new_obs[:, :-1], new_mask[:, :-1]
        return ImaginedStep(obs, reward, terminated, truncated, next_obs, Restart(ended, context_obs, context_mask))


class GatheringActorCritic(ActorCritic):
    """restart_rows as it was before static shapes: burn-in on the n restarted rows, index_copy."""

    def restart_rows(self, state, rows, context_obs, context_mask):
        if not bool(rows.any()):
            return state
        with torch.no_grad():
            warmed = self.burn_in(context_obs, context_mask)
        index = rows.nonzero().squeeze(-1)
        return tuple(s.index_copy(0, index, w.to(s.dtype)) for w, s in zip(warmed, state))


def _recorded(env: ImaginationEnv) -> list[ImaginedStep]:
    steps: list[ImaginedStep] = []
    step = env.step

    def recording(action: torch.Tensor) -> ImaginedStep:
        steps.append(step(action))
        return steps[-1]

    env.step = recording  # type: ignore[method-assign]
    return steps


def test_static_shape_step_gives_the_gathering_steps_results(tiny_params: Params, store: EpisodeStore) -> None:
    """Same seeds, same imagined frames, rewards, ends, actions and losses as the previous (gathering)
    step, over rows that end and restart mid-horizon (an untrained R ends rows at random)."""
    runs = []
    for env_cls, ac_cls in ((GatheringImaginationEnv, GatheringActorCritic), (ImaginationEnv, ActorCritic)):
        denoiser, reward_end = _models(tiny_params)
        env = env_cls(
            DiffusionSampler(denoiser, tiny_params.world_model.sampler, quantization=tiny_params.world_model.denoiser.quantization),
            reward_end, SegmentSampler(store, np.random.default_rng(5)), tiny_params.world_model.denoiser.num_conditioning_frames,
            batch_size=4, horizon=5, device=torch.device("cpu"))
        torch.manual_seed(1)
        ac = ac_cls(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
        with torch.no_grad():
            ac.actor.weight.normal_(0, 0.1)  # a non-uniform policy, so the actions tell the runs apart
        steps = _recorded(env)
        torch.manual_seed(7)
        cfg = dataclasses.replace(tiny_params.actor_critic, horizon=5)
        losses = []
        for _ in range(3):
            loss, metrics = imagination_loss(ac, env, cfg)
            loss.backward()
            losses.append((loss.detach(), metrics, [p.grad.clone() for p in ac.parameters() if p.grad is not None]))
        runs.append((steps, losses))
    (old_steps, old_losses), (new_steps, new_losses) = runs
    partial = [int(s.restart.rows.sum()) for s in new_steps]
    assert any(0 < k < 4 for k in partial), partial  # some rows restart mid-horizon while others go on
    for old, new in zip(old_steps, new_steps, strict=True):
        for name in ("obs", "final_obs", "reward", "terminated", "truncated"):
            torch.testing.assert_close(getattr(new, name), getattr(old, name), atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(new.restart.rows, old.restart.rows)
        torch.testing.assert_close(new.restart.context_obs[new.restart.rows], old.restart.context_obs)
    for (old_loss, old_m, old_g), (new_loss, new_m, new_g) in zip(old_losses, new_losses, strict=True):
        torch.testing.assert_close(new_loss, old_loss, atol=1e-5, rtol=1e-5)
        assert new_m == pytest.approx(old_m, rel=1e-4, abs=1e-6)
        for a, b in zip(new_g, old_g, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_imagination_gives_eager_results(tiny_params: Params, store: EpisodeStore) -> None:
    """params compile_imagination: the step's sampler + R under torch.compile(mode="reduce-overhead")
    and the actor-critic's forward under torch.compile (inductor on CPU) give eager mode's imagined frames,
    rewards, ends, actions and losses, with rows ending mid-horizon and the sampler's noise drawn
    outside the compiled code."""
    runs = []
    for compiled in (False, True):
        denoiser, reward_end = _models(tiny_params)
        env = ImaginationEnv(
            DiffusionSampler(denoiser, tiny_params.world_model.sampler, quantization=tiny_params.world_model.denoiser.quantization),
            reward_end, SegmentSampler(store, np.random.default_rng(5)), tiny_params.world_model.denoiser.num_conditioning_frames,
            batch_size=4, horizon=4, device=torch.device("cpu"), compile=compiled)
        torch.manual_seed(1)
        ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
        with torch.no_grad():
            ac.actor.weight.normal_(0, 0.1)  # a non-uniform policy, so the actions tell the runs apart
        actions: list[torch.Tensor] = []
        step = env.step
        env.step = lambda a: (actions.append(a.clone()), step(a))[1]  # type: ignore[method-assign]
        steps = _recorded(env)
        torch.manual_seed(7)
        cfg = dataclasses.replace(tiny_params.actor_critic, horizon=4)
        losses = []
        for _ in range(2):
            loss, metrics = imagination_loss(ac, env, cfg, compiled_forward(ac) if compiled else None)
            losses.append((loss.detach(), metrics))
        runs.append((steps, actions, losses))
    (eager_steps, eager_actions, eager_losses), (steps, actions, losses) = runs
    assert any(0 < int(s.restart.rows.sum()) < 4 for s in steps)
    assert len(steps) == len(eager_steps) == 8
    for old, new in zip(eager_steps, steps, strict=True):
        for name in ("obs", "final_obs", "reward", "terminated", "truncated"):
            torch.testing.assert_close(getattr(new, name), getattr(old, name), atol=1e-4, rtol=1e-4, msg=name)
    for old, new in zip(eager_actions, actions, strict=True):
        torch.testing.assert_close(new, old)
    for (old_loss, old_m), (new_loss, new_m) in zip(eager_losses, losses, strict=True):
        torch.testing.assert_close(new_loss, old_loss, atol=1e-4, rtol=1e-4)
        assert new_m == pytest.approx(old_m, rel=1e-3, abs=1e-5)


def _official_loop_updates(cfg, env: ImaginationEnv, ac: ActorCritic, n: int) -> list[float]:
    """`n` updates with rows going on across them (official env loop, rows A8 and A9); their losses."""
    cfg = dataclasses.replace(cfg, continue_rows_across_updates=True, burn_in="with_gradient_unmasked")
    losses = []
    for _ in range(n):
        loss, _ = imagination_loss(ac, env, cfg)
        loss.backward()  # frees the window's graph, the burn-ins' (with gradient) included
        losses.append(float(loss.detach()))
    return losses


def test_rows_going_on_across_updates_resume_exactly(tiny_params: Params, store: EpisodeStore) -> None:
    """The imagined rows in progress (ImaginationEnv.state_dict, with the actor-critic's carry) are
    all there is to resume: a fresh env loaded with them after update 2 gives update 3 as the
    uninterrupted env does; a fresh env without them starts its rows over and differs."""
    def fresh() -> tuple[ImaginationEnv, ActorCritic]:
        env = _env(tiny_params, store, horizon=3, batch=3)
        _force_end(env.reward_end, end=False)  # rows end by truncation only
        torch.manual_seed(4)
        ac = ActorCritic(tiny_params.actor_critic, num_actions(GAME), tiny_params.env.obs_size)
        with torch.no_grad():  # non-zero heads: the losses then depend on the frames and the LSTM states
            ac.actor.weight.normal_(0.0, 0.5)
            ac.critic.weight.normal_(0.0, 0.5)
        return env, ac

    cfg = dataclasses.replace(tiny_params.actor_critic, horizon=2)  # windows of 2 steps, rows truncated after 3
    env, ac = fresh()
    torch.manual_seed(5)
    _official_loop_updates(cfg, env, ac, 2)
    assert env.carry is not None and env.steps.tolist() == [1, 1, 1]  # rows restarted inside update 2 go on
    saved, rng, segments = env.state_dict(), torch.get_rng_state(), env.segments.rng.bit_generator.state
    third = _official_loop_updates(cfg, env, ac, 1)

    def third_update_of_a_fresh_env(state: dict | None) -> list[float]:
        other, other_ac = fresh()
        other_ac.load_state_dict(ac_after_two)
        other.load_state_dict(state)
        other.segments.rng.bit_generator.state = segments
        torch.set_rng_state(rng)
        return _official_loop_updates(cfg, other, other_ac, 1)

    ac_after_two = {k: v.clone() for k, v in ac.state_dict().items()}  # no optimiser step: weights unchanged
    assert third_update_of_a_fresh_env(saved) == third
    assert third_update_of_a_fresh_env(None) != third
