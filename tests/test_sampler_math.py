"""Karras schedule, Euler/Heun solvers, churn and 8-bit quantization, checked numerically."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diamond.config import SamplerConfig
from diamond.world_model.sampler import (
    DiffusionSampler,
    churn_gamma,
    euler_step,
    heun_step,
    karras_sigmas,
    quantize_8bit,
    sample_ode,
)


def sampler_cfg(**kw) -> SamplerConfig:
    base = dict(
        num_steps=3, sigma_min=2e-3, sigma_max=5.0, rho=7.0, order=1,
        s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, quantize=True, initial_noise="unit",
    )
    base.update(kw)
    return SamplerConfig(**base)


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_karras_schedule_endpoints_and_monotone(n):
    s = karras_sigmas(n, 2e-3, 5.0, 7.0)
    assert len(s) == n + 1
    assert s[0].item() == pytest.approx(5.0)
    assert s[-1].item() == 0.0
    if n > 1:
        assert s[-2].item() == pytest.approx(2e-3)
    assert torch.all(s[1:] < s[:-1])


def test_karras_schedule_known_values():
    # rho = 1 is a linear ramp; rho = 7 puts the middle level at ((a + b) / 2)^7 of the 7th roots.
    assert torch.allclose(karras_sigmas(3, 1.0, 3.0, 1.0), torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    mid = ((5.0 ** (1 / 7) + 2e-3 ** (1 / 7)) / 2) ** 7
    assert karras_sigmas(3, 2e-3, 5.0, 7.0)[1].item() == pytest.approx(mid)
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0, 2e-3, 5.0, 7.0)


def gaussian_denoiser(sigma_data: float):
    """Exact D for data ~ N(0, sigma_data^2): E[x0 | x] = x * sd^2 / (sd^2 + sigma^2)."""
    return lambda x, sigma: x * sigma_data**2 / (sigma_data**2 + sigma**2)


def gaussian_ode_solution(x_start: torch.Tensor, sd: float, s0: float, s1: float) -> torch.Tensor:
    # dx/dsigma = x sigma / (sd^2 + sigma^2)  =>  x(s) = x(s0) sqrt((sd^2 + s^2) / (sd^2 + s0^2)).
    return x_start * math.sqrt((sd**2 + s1**2) / (sd**2 + s0**2))


def test_euler_step_exact_on_point_mass():
    # Data is a single point x0: D = x0 everywhere, the ODE is a straight line, Euler is exact.
    x0 = torch.tensor([0.3, -0.7])
    x = torch.tensor([2.0, 1.0])
    out = euler_step(x, x0, sigma=2.0, sigma_next=0.5)
    assert torch.allclose(out, x0 + (x - x0) * 0.25)
    assert torch.allclose(euler_step(x, x0, 2.0, 0.0), x0)


def _solve(order: int, n: int, sd: float = 0.5) -> float:
    """Max error of an n-step uniform solve of the Gaussian ODE from sigma 5 to 0.1."""
    denoise = gaussian_denoiser(sd)
    x_start = torch.linspace(-3, 3, 7, dtype=torch.float64)
    sigmas = torch.linspace(5.0, 0.1, n + 1, dtype=torch.float64).tolist()
    x = x_start.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        x = euler_step(x, d, s, s_next) if order == 1 else heun_step(x, d, s, s_next, denoise)
    return (x - gaussian_ode_solution(x_start, sd, 5.0, 0.1)).abs().max().item()


def test_solvers_converge_at_their_order_on_gaussian_data():
    e_euler = [_solve(1, n) for n in (20, 40)]
    e_heun = [_solve(2, n) for n in (20, 40)]
    assert e_euler[1] < 0.03 and e_heun[1] < 3e-3
    assert e_heun[0] < e_euler[0] / 4  # second order beats first order at equal steps
    assert 1.7 < e_euler[0] / e_euler[1] < 2.3  # halving the step halves Euler's error
    assert 3.4 < e_heun[0] / e_heun[1] < 4.6  # and quarters Heun's


def test_heun_to_zero_is_euler():
    denoise = gaussian_denoiser(0.5)
    x = torch.tensor([1.0, -2.0])
    d = denoise(x, 0.3)
    assert torch.equal(heun_step(x, d, 0.3, 0.0, denoise), euler_step(x, d, 0.3, 0.0))


def test_quantize_8bit():
    grid = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(quantize_8bit(grid), grid, atol=1e-6)
    x = torch.rand(1000) * 2.4 - 1.2
    q = quantize_8bit(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert q.min() >= -1 and q.max() <= 1
    inside = x.abs() <= 1
    assert (q[inside] - x[inside]).abs().max() <= 1 / 255 + 1e-6


def test_churn_only_when_asked():
    assert churn_gamma(sampler_cfg(), 1.0) == 0.0
    cfg = sampler_cfg(s_churn=1.0, s_tmin=0.05, s_tmax=2.0)
    assert churn_gamma(cfg, 1.0) == pytest.approx(1 / 3)
    assert churn_gamma(cfg, 3.0) == 0.0 and churn_gamma(cfg, 0.01) == 0.0
    assert churn_gamma(sampler_cfg(s_churn=100.0), 1.0) == pytest.approx(math.sqrt(2) - 1)
    # With churn, the solution depends on the injected noise; without, it does not.
    denoise = gaussian_denoiser(0.5)
    x = torch.ones(4)
    sig = karras_sigmas(5, 2e-3, 5.0, 7.0)
    outs = [sample_ode(denoise, x, sig, sampler_cfg(num_steps=5, s_churn=5.0), torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.allclose(outs[0], outs[1])
    plain = [sample_ode(denoise, x, sig, sampler_cfg(num_steps=5), torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert torch.equal(plain[0], plain[1])


class PointDenoiser:
    """A denoiser that knows the answer: always predicts `target` (and records the sigmas asked)."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target, self.sigmas = target, []

    def denoise(self, noisy, sigma, prev_obs, prev_act):
        self.sigmas.append(float(sigma))
        return self.target.expand_as(noisy)


@pytest.mark.parametrize("order", [1, 2])
def test_diffusion_sampler_returns_quantized_estimate(order):
    target = torch.full((1, 3, 8, 8), 0.1234)
    den = PointDenoiser(target)
    cfg = sampler_cfg(order=order)
    out = DiffusionSampler(den, cfg, quantization="nearest").sample(torch.zeros(2, 4, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long))
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, quantize_8bit(target).expand(2, -1, -1, -1), atol=1e-6)
    assert den.sigmas[0] == pytest.approx(5.0)
    assert len(den.sigmas) == (3 if order == 1 else 5)  # Heun: 2 evaluations per step except the last
    unq = DiffusionSampler(PointDenoiser(target), dataclasses.replace(cfg, quantize=False), quantization="nearest")
    assert torch.allclose(unq.sample(torch.zeros(1, 4, 3, 8, 8), torch.zeros(1, 4, dtype=torch.long)), target)


def data_levels() -> torch.Tensor:
    """The 256 uint8 levels as the data reach the models (diamond.data.Segment.to_torch)."""
    return torch.arange(256, dtype=torch.uint8).float().div_(127.5).sub_(1.0)


def official_quantize(x: torch.Tensor) -> torch.Tensor:
    """The official wrap_model_output's quantization (src/models/diffusion/denoiser.py)."""
    return x.clamp(-1, 1).add(1).div(2).mul(255).byte().div(255).mul(2).sub(1)


def test_truncate_is_the_official_byte_cast_and_rounds_some_levels_down():
    levels = data_levels()
    trunc, near = quantize_8bit(levels, "truncate"), quantize_8bit(levels, "nearest")
    assert torch.equal(trunc, official_quantize(levels))  # bit for bit in float32
    assert torch.equal(near, levels)  # exact levels stay where they are
    # Even an exact estimate of 63 of the 256 levels comes out one level low (never more, never high).
    steps = ((trunc - levels) * 127.5).round()
    assert int((steps == -1).sum()) == 63
    assert int((steps == 0).sum()) == 256 - 63
    # Anywhere in (and beyond) [-1, 1], truncation is the official arithmetic, and rounds down:
    # it is at most one level below the nearest level, never above it.
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2, levels])
    t, n = quantize_8bit(x, "truncate"), quantize_8bit(x, "nearest")
    assert torch.equal(t, official_quantize(x))
    diff = ((n - t) * 127.5).round()
    assert set(diff.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="quantization"):
        quantize_8bit(x, "floor")


@pytest.mark.parametrize("mode", ["nearest", "truncate"])
def test_sampler_quantizes_with_the_given_rule(mode):
    # A level that truncation puts one below: the sampler's output shows which rule it used.
    levels = data_levels()
    low = torch.nonzero(official_quantize(levels) != levels)[0].item()
    target = levels[low].reshape(1, 1, 1, 1).expand(1, 3, 4, 4)
    out = DiffusionSampler(PointDenoiser(target), sampler_cfg(), quantization=mode).sample(
        torch.zeros(1, 4, 3, 4, 4), torch.zeros(1, 4, dtype=torch.long)
    )
    expected = official_quantize(target) if mode == "truncate" else target
    assert torch.equal(out, expected)
    assert torch.equal(out, target) == (mode == "nearest")


class FirstInputDenoiser:
    """Records the noisy input of its first call (the sampler's initial x) and predicts zeros."""

    def __init__(self) -> None:
        self.first = None

    def denoise(self, noisy, sigma, prev_obs, prev_act):
        if self.first is None:
            self.first = noisy.clone()
        return torch.zeros_like(noisy)


def test_initial_noise_unit_or_sigma_max():
    prev_obs, prev_act = torch.zeros(64, 4, 3, 32, 32), torch.zeros(64, 4, dtype=torch.long)
    starts = {}
    for mode in ("unit", "sigma_max"):
        den = FirstInputDenoiser()
        DiffusionSampler(den, sampler_cfg(initial_noise=mode), quantization="nearest").sample(
            prev_obs, prev_act, generator=torch.Generator().manual_seed(0)
        )
        starts[mode] = den.first
    # The official sampler starts from N(0, I) (src/models/diffusion/diffusion_sampler.py); EDM
    # from sigma_max * N(0, I). Same draws, scaled by sigma_max = 5.
    assert starts["unit"].std().item() == pytest.approx(1.0, abs=0.02)
    assert starts["sigma_max"].std().item() == pytest.approx(5.0, abs=0.1)
    assert torch.equal(starts["sigma_max"], starts["unit"] * 5.0)
    with pytest.raises(ValueError, match="initial_noise"):
        DiffusionSampler(FirstInputDenoiser(), sampler_cfg(initial_noise="zero"), quantization="nearest")
    with pytest.raises(ValueError, match="quantization"):
        DiffusionSampler(FirstInputDenoiser(), sampler_cfg(), quantization="round")
