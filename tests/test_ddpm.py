"""DDPM as the official `ddpm` branch does it (diamond/world_model/ddpm.py, Denoiser formulation "ddpm").

Expected values are derived here by hand in float64 numpy from the formulas (Ho et al. 2020 and
diffusers 0.17's DDPMScheduler as the branch configures it), not from our code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diamond.config import ConfigError, params_from_dict
from diamond.world_model import ddpm
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.model import build_world_model
from conftest import tiny_params_dict
from test_denoiser import random_segment

T = 1000


def np_alphas_cumprod() -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), beta linear from 1e-4 to 0.02 over 1000 steps."""
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1)
    return np.cumprod(1 - betas)


def np_truncate_8bit(x: np.ndarray) -> np.ndarray:
    """The branch's clamp(-1, 1).add(1).div(2).mul(255).byte().div(255).mul(2).sub(1)."""
    return np.floor((np.clip(x, -1, 1) + 1) / 2 * 255) / 255 * 2 - 1


def ddpm_cfg(tiny_params, **kw):
    return dataclasses.replace(tiny_params.world_model.denoiser, formulation="ddpm", **kw)


class ToyNoisePredictor:
    """eps(x_t, t) = 0.5 x_t + 0.1 (last past frame): known, and reads the conditioning."""

    def __init__(self) -> None:
        self.alphas_cumprod = ddpm.linear_alphas_cumprod(T)
        self.timesteps: list[list[int]] = []

    def predict_noise(self, x_t, t, prev_obs, prev_act):
        self.timesteps.append(t.tolist())
        return 0.5 * x_t + 0.1 * prev_obs[:, -1]


def np_toy_eps(x: np.ndarray, last_frame: np.ndarray) -> np.ndarray:
    return 0.5 * x + 0.1 * last_frame


# --- schedule ---------------------------------------------------------------------------------


def test_alphas_cumprod_at_0_499_999():
    ours = ddpm.linear_alphas_cumprod(T)
    assert ours.dtype == torch.float32 and ours.shape == (T,)
    hand = np_alphas_cumprod()
    np.testing.assert_allclose(ours[[0, 499, 999]].double().numpy(), hand[[0, 499, 999]], rtol=1e-5)
    # The numbers themselves: 1 - 1e-4 at t = 0; about 0.0786 and 4.04e-5 later.
    np.testing.assert_allclose(ours[[0, 499, 999]].double().numpy(), [0.9999, 0.0785872, 4.03583e-5], rtol=1e-5)


@pytest.mark.parametrize(
    "n, grid",
    [
        (3, [666, 333, 0]),  # T // 3 = 333: starts at 666, not at 999
        (10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (1, [0]),
    ],
)
def test_set_timesteps_grid(n, grid):
    assert ddpm.inference_timesteps(n, T) == grid
    # previous_timestep: one grid step down, below 0 after the last one.
    prev = [ddpm.previous_timestep(t, n, T) for t in grid]
    assert prev == grid[1:] + [-(T // n)]


def test_set_timesteps_rejects_more_steps_than_timesteps():
    assert ddpm.inference_timesteps(T, T) == list(range(T - 1, -1, -1))
    for n in (0, T + 1):
        with pytest.raises(ValueError, match="must be in"):
            ddpm.inference_timesteps(n, T)


def test_c_noise_is_t_plus_one_over_T():
    c = ddpm.c_noise(torch.tensor([0, 499, 999]), T)
    assert c.dtype == torch.float32
    np.testing.assert_allclose(c.numpy(), [0.001, 0.5, 1.0], rtol=1e-7)


# --- one step() -------------------------------------------------------------------------------


def toy_step_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # x0 estimates of these at t = 666 land inside and outside [-1, 1], so clipping is exercised.
    x = torch.tensor([-1.2, -0.3, 0.0, 0.4, 1.5, 0.05]).reshape(1, 1, 2, 3)
    eps = torch.tensor([0.9, -1.0, 0.2, 0.5, -0.7, 0.0]).reshape(1, 1, 2, 3)
    return x, eps


def np_posterior(x: np.ndarray, eps: np.ndarray, t: int, t_prev: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Ho et al. eqs. 6-7 between grid timesteps t and t_prev, x0 clipped to [-1, 1]."""
    ab = np_alphas_cumprod()
    a_t, a_p = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)
    beta = 1 - a_t / a_p
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
    mean = np.sqrt(a_p) * beta / (1 - a_t) * x0 + np.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * x
    var = (1 - a_p) / (1 - a_t) * beta
    return mean, var, x0


def test_posterior_mean_and_variance_from_666_to_333():
    x, eps = toy_step_inputs()
    ab = ddpm.linear_alphas_cumprod(T)
    x0 = ddpm.predict_x0(x, eps, ab[666]).clamp(-1, 1)
    mean, var = ddpm.posterior(x, x0, ab[666], ab[333])
    hand_mean, hand_var, hand_x0 = np_posterior(x.double().numpy(), eps.double().numpy(), 666, 333)
    assert (np.abs(hand_x0) == 1).sum() == 4  # four of the six clip, two do not
    np.testing.assert_allclose(x0.double().numpy(), hand_x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean.double().numpy(), hand_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.item(), hand_var, rtol=1e-5)
    # alpha_bar ~ exp(-sum beta): 0.32 at 333, 0.011 at 666, so var ~ 0.68/0.99 * (1 - 0.035) ~ 0.665.
    assert 0.66 < hand_var < 0.67


def test_step_adds_posterior_noise_drawn_from_the_generator():
    x, eps = toy_step_inputs()
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double().numpy()
    out = ddpm.ddpm_step(x, eps, 666, 333, ddpm.linear_alphas_cumprod(T), gen)
    hand_mean, hand_var, _ = np_posterior(x.double().numpy(), eps.double().numpy(), 666, 333)
    np.testing.assert_allclose(out.double().numpy(), hand_mean + np.sqrt(hand_var) * z, rtol=1e-5, atol=1e-6)


def test_last_step_from_0_is_the_clipped_x0_without_noise():
    x, eps = toy_step_inputs()
    gen = torch.Generator().manual_seed(7)
    before = gen.get_state()
    out = ddpm.ddpm_step(x, eps, 0, -333, ddpm.linear_alphas_cumprod(T), gen)
    _, _, hand_x0 = np_posterior(x.double().numpy(), eps.double().numpy(), 0, -333)
    np.testing.assert_allclose(out.double().numpy(), hand_x0, rtol=1e-5, atol=1e-6)
    assert torch.equal(gen.get_state(), before)  # no noise drawn at t = 0


# --- the sampler ------------------------------------------------------------------------------


def sampler_inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    prev_obs = torch.linspace(-1, 1, b * 4 * 3 * 4 * 4).reshape(b, 4, 3, 4, 4)
    return prev_obs, torch.zeros(b, 4, dtype=torch.long)


def sampler(num_steps: int, quantize: bool, model=None) -> ddpm.DDPMSampler:
    cfg = dataclasses.replace(params_from_dict(tiny_params_dict()).world_model.sampler, num_steps=num_steps, quantize=quantize)
    return ddpm.DDPMSampler(model or ToyNoisePredictor(), cfg, quantization="truncate")


def test_one_step_sampler_reads_x0_at_t_500_from_unit_noise():
    prev_obs, prev_act = sampler_inputs()
    model = ToyNoisePredictor()
    out = sampler(1, quantize=True, model=model).sample(prev_obs, prev_act, torch.Generator().manual_seed(3))
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(3)).double().numpy()
    a = np_alphas_cumprod()[500]
    eps = np_toy_eps(x, prev_obs[:, -1].double().numpy())
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    assert model.timesteps == [[500, 500]]
    assert (np.abs(x0) > 1).any() and (np.abs(x0) < 1).any()
    # No hand value within 1e-4 of a quantization boundary, so float32 cannot land elsewhere.
    levels = (np.clip(x0, -1, 1) + 1) / 2 * 255
    assert np.abs(levels[np.abs(x0) < 1] - np.round(levels[np.abs(x0) < 1])).min() > 1e-4
    np.testing.assert_allclose(out.double().numpy(), np_truncate_8bit(x0), atol=1e-6)
    unq = sampler(1, quantize=False).sample(prev_obs, prev_act, torch.Generator().manual_seed(3))
    np.testing.assert_allclose(unq.double().numpy(), np.clip(x0, -1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [3, 10])
def test_multi_step_sampler_runs_step_on_the_grid(n):
    prev_obs, prev_act = sampler_inputs()
    model = ToyNoisePredictor()
    out = sampler(n, quantize=False, model=model).sample(prev_obs, prev_act, torch.Generator().manual_seed(5))
    grid = ddpm.inference_timesteps(n, T)
    assert model.timesteps == [[t, t] for t in grid]
    # By hand: x ~ N(0, I), then per grid step the posterior mean plus, for t > 0, its noise,
    # drawn from the same generator in that order.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((2, 3, 4, 4), generator=gen).double().numpy()
    last = prev_obs[:, -1].double().numpy()
    for t in grid:
        mean, var, _ = np_posterior(x, np_toy_eps(x, last), t, t - T // n)
        x = mean + (np.sqrt(var) * torch.randn((2, 3, 4, 4), generator=gen).double().numpy() if t > 0 else 0)
    np.testing.assert_allclose(out.double().numpy(), np.clip(x, -1, 1), rtol=1e-4, atol=1e-5)


def test_multi_step_sampler_is_stochastic_and_quantized():
    prev_obs, prev_act = sampler_inputs()
    s = sampler(3, quantize=True)
    a, b = (s.sample(prev_obs, prev_act, torch.Generator().manual_seed(k)) for k in (0, 1))
    assert not torch.equal(a, b)
    levels = (a + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and a.min() >= -1 and a.max() <= 1


# --- the denoiser (training side) -------------------------------------------------------------


def test_training_inputs_offset_noise_in_x_t_and_in_the_target(tiny_params):
    den = Denoiser(ddpm_cfg(tiny_params), num_actions=4)
    x0 = torch.linspace(-1, 1, 3 * 3 * 4 * 4).reshape(3, 3, 4, 4)
    torch.manual_seed(11)
    x_t, c_noise, target, to_x0 = den.ddpm_training_inputs(x0)
    # The branch's draws, in its order: offset (B, C, 1, 1), noise, timesteps.
    torch.manual_seed(11)
    offset = torch.randn(3, 3, 1, 1).double().numpy()
    z = torch.randn(3, 3, 4, 4).double().numpy()
    t = torch.randint(0, T, (3,)).numpy()
    eps = 0.3 * offset + z
    a = np_alphas_cumprod()[t][:, None, None, None]
    np.testing.assert_allclose(target.double().numpy(), eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_t.double().numpy(), np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_noise.numpy(), (t + 1) / T, rtol=1e-6)
    # The estimate fed back by autoregressive steps inverts the noising given the true noise.
    torch.testing.assert_close(to_x0(target), x0, rtol=0, atol=2e-4)


def test_loss_is_masked_epsilon_mse_with_offset_noise(tiny_params):
    torch.manual_seed(0)
    den = Denoiser(ddpm_cfg(tiny_params, num_autoregressive_steps=0), num_actions=4)
    # Fresh F: the output conv's weight is zero, so F outputs its bias per channel whatever the input.
    bias = den.net.conv_out.bias.detach().double().numpy()[None, :, None, None]
    seg = random_segment(3, den.cfg.training_segment_steps, seed=4)
    seg.mask[2, :] = False  # sample 2 is padding, its target included
    torch.manual_seed(1)
    loss, _ = den.compute_loss(seg.to_torch())
    torch.manual_seed(1)
    offset, z = torch.randn(3, 3, 1, 1).double().numpy(), torch.randn(3, 3, 16, 16).double().numpy()
    eps = 0.3 * offset + z
    hand = ((bias - eps)[:2] ** 2).mean()
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert hand > 1.0  # the offset adds 0.09 to the target's variance


def test_conditioning_frames_are_not_rescaled(tiny_params, monkeypatch):
    inputs = {}
    prev_obs = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    for formulation in ("edm", "ddpm"):
        den = Denoiser(dataclasses.replace(tiny_params.world_model.denoiser, formulation=formulation), num_actions=4)
        monkeypatch.setattr(den.net, "forward", lambda x, cond, f=formulation: inputs.setdefault(f, x))
        den.network(torch.zeros(2, 3, 8, 8), torch.zeros(2), prev_obs, torch.zeros(2, 4, dtype=torch.long))
    frames = prev_obs.reshape(2, 12, 8, 8)
    assert torch.equal(inputs["ddpm"][:, :12], frames)
    assert torch.equal(inputs["edm"][:, :12], frames / 0.5)  # EDM divides by sigma_data


def test_predict_noise_feeds_x_t_unscaled_and_t_plus_one_over_T(tiny_params, monkeypatch):
    den = Denoiser(ddpm_cfg(tiny_params), num_actions=4)
    seen = {}

    def recording(name, forward):
        def wrapped(first, *rest):
            seen[name] = first
            return forward(first, *rest)
        return wrapped

    monkeypatch.setattr(den.noise_emb, "forward", recording("c_noise", den.noise_emb.forward))
    monkeypatch.setattr(den.net, "forward", recording("x", den.net.forward))
    x_t = torch.randn(3, 3, 8, 8) * 2
    out = den.predict_noise(x_t, torch.tensor([0, 499, 999]), torch.zeros(3, 4, 3, 8, 8), torch.zeros(3, 4, dtype=torch.long))
    assert out.shape == x_t.shape
    np.testing.assert_allclose(seen["c_noise"].numpy(), [0.001, 0.5, 1.0], rtol=1e-7)
    assert torch.equal(seen["x"][:, 12:], x_t)
    with pytest.raises(RuntimeError, match="formulation 'edm', not 'ddpm'"):
        den.denoise(x_t, 1.0, torch.zeros(3, 4, 3, 8, 8), torch.zeros(3, 4, dtype=torch.long))


def test_ddpm_keeps_the_network_and_checkpoint_layout(tiny_params):
    edm = Denoiser(tiny_params.world_model.denoiser, num_actions=4)
    den = Denoiser(ddpm_cfg(tiny_params), num_actions=4)
    assert edm.state_dict().keys() == den.state_dict().keys()  # alphas_cumprod is not persistent
    assert all(edm.state_dict()[k].shape == v.shape for k, v in den.state_dict().items())


@pytest.mark.parametrize("k", [0, 1])
def test_world_model_samples_with_the_ddpm_sampler(tiny_params, k):
    wm_cfg = dataclasses.replace(tiny_params.world_model, denoiser=ddpm_cfg(tiny_params, num_autoregressive_steps=k))
    wm = build_world_model(wm_cfg, num_actions=4, obs_size=16, device=torch.device("cpu"))
    assert isinstance(wm.sampler, ddpm.DDPMSampler)
    loss, _ = wm.denoiser.compute_loss(random_segment(2, wm_cfg.denoiser.training_segment_steps).to_torch())
    loss.backward()
    assert torch.isfinite(loss)
    out = wm.sampler.sample(torch.rand(2, 4, 3, 16, 16) * 2 - 1, torch.zeros(2, 4, dtype=torch.long))
    assert out.shape == (2, 3, 16, 16)


def test_ddpm_sampler_steps_are_validated_by_the_config():
    d = tiny_params_dict()
    d["world_model"]["denoiser"]["formulation"] = "ddpm"
    d["world_model"]["denoiser"]["ddpm_num_timesteps"] = 10
    d["world_model"]["sampler"]["num_steps"] = 11
    with pytest.raises(ConfigError, match=r"sampler.num_steps: 11 must be in \[1, 10\]"):
        params_from_dict(d)
