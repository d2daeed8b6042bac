"""Sampling the next frame from the denoiser (docs/architecture.md §3.2): Karras schedule, Euler/Heun, churn.

The ODE is the variance-exploding probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.
Where it starts is `sampler.initial_noise`:
- "unit": x ~ N(0, I), std 1, although the first step treats x as being at sigma_max. This is
  what DIAMOND's sampler does (official src/models/diffusion/diffusion_sampler.py,
  `x = torch.randn(b, c, h, w)`), so its samples are less noisy and closer to the conditional mean.
- "sigma_max": x ~ sigma_max * N(0, I), standard EDM (Karras et al. 2022, Algorithm 1).
In both, the offset noise of training is not added at the start: the denoiser's conditioners
always include it (s = sqrt(sigma^2 + 0.3^2)), as in the official sampler.

With `quantize`, each denoised estimate is clamped and put on the 256 levels of the uint8 data
before the solver uses it, as the official denoiser does (`wrap_model_output`), with the
denoiser's rounding rule `quantization` ("nearest" rounds, "truncate" is the official `.byte()`,
see `quantize_8bit`). The last step goes to sigma = 0, where an Euler step returns the (quantized)
denoised estimate itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from diamond.config import SamplerConfig

class DenoiserLike(Protocol):
    def denoise(self, noisy_next_obs: Tensor, sigma: Tensor | float, prev_obs: Tensor, prev_act: Tensor) -> Tensor: ...


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """num_steps noise levels from sigma_max down to sigma_min (Karras et al. eq. 5), then a final 0."""
    if num_steps < 1:
        raise ValueError(f"sampler.num_steps: {num_steps} must be >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sampler: need 0 < sigma_min ({sigma_min}) <= sigma_max ({sigma_max})")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        inv_rho_max, inv_rho_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


QUANTIZATIONS = ("nearest", "truncate")


def quantize_8bit(x: Tensor, mode: str = "nearest") -> Tensor:
    """Put a [-1, 1] image on the 256 levels of uint8 data (x = u / 127.5 - 1), clamping first.

    "nearest" rounds to the nearest level (unbiased). "truncate" is the official arithmetic
    (src/models/diffusion/denoiser.py, `wrap_model_output`): clamp(-1, 1).add(1).div(2).mul(255),
    then `.byte()`, which rounds down, then div(255).mul(2).sub(1), in that order. In float32
    (u / 127.5 - 1 + 1) / 2 * 255 lands just below u for 63 of the 256 levels, so even an exact
    estimate of those levels comes out one level (1/127.5) low.
    """
    if mode == "nearest":
        return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    if mode == "truncate":
        # floor() equals the uint8 cast on [0, 255] and keeps x's dtype and device.
        return x.clamp(-1, 1).add(1).div(2).mul(255).floor().div(255).mul(2).sub(1)
    raise ValueError(f"quantization: {mode!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")


def euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of dx/dsigma = (x - denoised)/sigma from sigma to sigma_next."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def heun_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, denoise_fn) -> Tensor:
    """Heun (trapezoidal) step; falls back to Euler when stepping to sigma = 0 (as in EDM)."""
    x_euler = euler_step(x, denoised, sigma, sigma_next)
    if sigma_next == 0:
        return x_euler
    d = (x - denoised) / sigma
    d_next = (x_euler - denoise_fn(x_euler, sigma_next)) / sigma_next
    return x + (d + d_next) / 2 * (sigma_next - sigma)


def churn_gamma(cfg: SamplerConfig, sigma: float) -> float:
    """EDM's stochastic churn: how much to raise sigma before the step (0 = deterministic)."""
    if cfg.s_churn == 0 or not cfg.s_tmin <= sigma <= cfg.s_tmax:
        return 0.0
    return min(cfg.s_churn / cfg.num_steps, math.sqrt(2) - 1)


def sample_ode(
    denoise_fn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    churn_noise: list[Tensor] | None = None,
) -> Tensor:
    """Integrate from x at sigmas[0] down to sigmas[-1] = 0 with the configured solver.

    The churn's N(0, I) draws come from `churn_noise` (one per churned step, in order) when
    given, else are drawn here with `generator`. `sigmas` may be the Python floats of
    `karras_sigmas`'s tensor (`DiffusionSampler.sigma_values`): under torch.compile the loop then
    unrolls on constants, where reading a float tensor's values would break the graph."""
    churn = iter(churn_noise) if churn_noise is not None else None
    levels = sigmas.tolist() if isinstance(sigmas, Tensor) else list(sigmas)
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        gamma = churn_gamma(cfg, sigma)
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)
            if churn is None:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                eps = next(churn)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * cfg.s_noise * eps
            sigma = sigma_hat
        denoised = denoise_fn(x, sigma)
        if cfg.order == 1:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            x = heun_step(x, denoised, sigma, sigma_next, denoise_fn)
    return x


class DiffusionSampler:
    """Generates the next frame from the past L frames and actions with a trained denoiser.

    `quantization` is the denoiser's (`world_model.denoiser.quantization`), used when
    `cfg.quantize`.
    """

    def __init__(self, denoiser: DenoiserLike, cfg: SamplerConfig, *, quantization: str) -> None:
        if cfg.initial_noise not in ("unit", "sigma_max"):
            raise ValueError(f"sampler.initial_noise: {cfg.initial_noise!r} is not 'unit' or 'sigma_max'")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")
        self.denoiser = denoiser
        self.cfg = cfg
        self.quantization = quantization
        self.sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        # The same levels as Python floats (tolist is exact), read once here and not at every
        # imagined step: `integrate` then has no host read, and dynamo no graph break on it.
        self.sigma_values: tuple[float, ...] = tuple(self.sigmas.tolist())

    @torch.no_grad()
    def sample(self, prev_obs: Tensor, prev_act: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """prev_obs float (B, L, 3, H, W) in [-1, 1], prev_act long (B, L) -> next_obs (B, 3, H, W)."""
        return self.integrate(self.draw_noise(prev_obs, generator), prev_obs, prev_act)

    def draw_noise(self, prev_obs: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """All random numbers of one `sample`, in the order it uses them: the start x ~ N(0, I)
        (B, 3, H, W), then one N(0, I) per step with churn. Drawn apart from `integrate` so that a
        compiled `integrate` (params compile_imagination) gives eager mode's samples."""
        b, _, c, h, w = prev_obs.shape
        steps_with_churn = sum(churn_gamma(self.cfg, s) > 0 for s in self.sigma_values[:-1])
        return [torch.randn((b, c, h, w), generator=generator, device=prev_obs.device, dtype=torch.float32)
                for _ in range(1 + steps_with_churn)]

    @torch.no_grad()
    def integrate(self, noise: list[Tensor], prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """The next frame from `draw_noise`'s numbers: deterministic, no host sync, no graph
        break under torch.compile(fullgraph=True) (tests/test_compiled_step.py)."""
        x = noise[0] * self.cfg.sigma_max if self.cfg.initial_noise == "sigma_max" else noise[0]

        def denoise_fn(x_noisy: Tensor, sigma: float) -> Tensor:
            denoised = self.denoiser.denoise(x_noisy, sigma, prev_obs, prev_act)
            return quantize_8bit(denoised, self.quantization) if self.cfg.quantize else denoised

        x = sample_ode(denoise_fn, x, self.sigma_values, self.cfg, churn_noise=noise[1:])
        return x.clamp(-1, 1)
