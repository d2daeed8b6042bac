"""DDPM as the official `ddpm` branch does it (DIAMOND paper section 5.1, the EDM-vs-DDPM ablation).

The branch (eloialonso/diamond, branch `ddpm`) trains and samples with diffusers 0.17's
`DDPMScheduler(num_train_timesteps=1000)` on its defaults. This module is our own
implementation of the parts it uses, without diffusers:

- the schedule: betas linear from 1e-4 to 0.02 over T = 1000 steps, computed in float32 as the
  scheduler does, alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1
  (diffusers v0.17.0 src/diffusers/schedulers/scheduling_ddpm.py:140-158);
- noising, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (scheduling_ddpm.py:408-429);
- the inference grid of `set_timesteps(n)`: t_i = i * (T // n), i = n-1..0 (scheduling_ddpm.py:230-236),
  whose previous timestep is t - T // n (scheduling_ddpm.py:454-467), alpha_bar = 1 below 0;
- one reverse step `step()`: x0 estimate from epsilon, clipped to [-1, 1] (`clip_sample=True`,
  `clip_sample_range=1.0`, the defaults the branch keeps), the posterior mean of Ho et al.
  eq. 7 and, for t > 0, Gaussian noise of the "fixed_small" posterior variance
  (scheduling_ddpm.py:238-276, 312-406);
- the branch's sampler (ddpm:src/models/diffusion/diffusion_sampler.py:24-60): from x ~ N(0, I),
  one step reads the x0 estimate at t = T // 2 directly; n > 1 steps run `step()` over the
  `set_timesteps(n)` grid. The result is clamped and quantized once, at the end.

The denoiser side (c_noise, epsilon-MSE loss with offset noise, unscaled conditioning frames)
lives in `diamond.world_model.denoiser`, formulation "ddpm".
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from diamond.config import SamplerConfig
from diamond.world_model.sampler import QUANTIZATIONS, quantize_8bit

# DDPMScheduler's default linear schedule, which the branch keeps
# (ddpm:src/models/diffusion/denoiser.py:27 passes only num_train_timesteps).
BETA_START = 1e-4
BETA_END = 0.02
# step() clips its x0 estimate to [-CLIP, CLIP]: DDPMScheduler defaults clip_sample=True,
# clip_sample_range=1.0 (scheduling_ddpm.py:130-135, 372-375), the data range [-1, 1].
CLIP = 1.0
# "fixed_small" clamps the posterior variance away from 0 (scheduling_ddpm.py:251).
MIN_VARIANCE = 1e-20


class NoisePredictor(Protocol):
    """What the sampler needs from the denoiser (`diamond.world_model.denoiser.Denoiser`, formulation "ddpm")."""

    alphas_cumprod: Tensor  # (T,) float32

    def predict_noise(self, x_t: Tensor, t: Tensor, prev_obs: Tensor, prev_act: Tensor) -> Tensor: ...


def linear_alphas_cumprod(num_timesteps: int) -> Tensor:
    """alpha_bar_t for t = 0..T-1 of the linear schedule, float32 like DDPMScheduler's table."""
    betas = torch.linspace(BETA_START, BETA_END, num_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def c_noise(t: Tensor, num_timesteps: int) -> Tensor:
    """The network's noise input (t + 1) / T for integer t (ddpm:src/models/diffusion/denoiser.py:34):
    1/T .. 1, never 0."""
    return (t + 1) / num_timesteps


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise; alpha_bar is per sample, shape (B,)."""
    a = alpha_bar.to(x0.dtype)[:, None, None, None]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (Ho et al. eq. 15). alpha_bar is a
    0-dim tensor or per sample (B,); not clipped (the branch's one-step path does not clip)."""
    a = alpha_bar.reshape(alpha_bar.shape + (1,) * (x_t.ndim - alpha_bar.ndim))
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


def inference_timesteps(num_steps: int, num_timesteps: int) -> list[int]:
    """`set_timesteps(n)`'s grid, decreasing: i * (T // n) for i = n-1..0 (scheduling_ddpm.py:232-233).

    It starts at (n-1) * (T // n), not at T - 1: for n = 3, [666, 333, 0]."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"DDPM sampling steps: {num_steps} must be in [1, {num_timesteps}]")
    ratio = num_timesteps // num_steps
    return [i * ratio for i in range(num_steps - 1, -1, -1)]


def previous_timestep(t: int, num_steps: int, num_timesteps: int) -> int:
    """The timestep `step()` goes to from t: t - T // n, negative after the last (scheduling_ddpm.py:462-465)."""
    return t - num_timesteps // num_steps


def posterior(
    x_t: Tensor, x0: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_prev | x_t, x0) (Ho et al. eqs. 6-7) between two grid timesteps.

    The step's beta is 1 - alpha_bar_t / alpha_bar_prev (grids skip timesteps), as in
    scheduling_ddpm.py:348-384 and 241-251 ("fixed_small"). Scalars are 0-dim tensors so that
    the float32 arithmetic follows the scheduler's.
    """
    beta_prod_t, beta_prod_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
    alpha_step = alpha_bar_t / alpha_bar_prev
    beta_step = 1 - alpha_step
    coef_x0 = alpha_bar_prev**0.5 * beta_step / beta_prod_t
    coef_xt = alpha_step**0.5 * beta_prod_prev / beta_prod_t
    mean = coef_x0 * x0 + coef_xt * x_t
    variance = (beta_prod_prev / beta_prod_t * beta_step).clamp(min=MIN_VARIANCE)
    return mean, variance


def ddpm_step(
    x_t: Tensor,
    eps: Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """One `DDPMScheduler.step()` from t to t_prev (< 0 after the last step) with the branch's
    configuration: epsilon prediction, x0 clipped to [-1, 1], fixed_small variance, noise only
    when t > 0 (so the step from t = 0 returns the clipped x0 estimate exactly). The step's
    N(0, I) is `noise` when given, else drawn with `generator`."""
    alpha_bar_t = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(alpha_bar_t)
    x0 = predict_x0(x_t, eps, alpha_bar_t).clamp(-CLIP, CLIP)
    mean, variance = posterior(x_t, x0, alpha_bar_t, alpha_bar_prev)
    if t == 0:
        return mean
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + variance**0.5 * noise


class DDPMSampler:
    """The branch's sampler (ddpm:src/models/diffusion/diffusion_sampler.py:24-60).

    Reads `cfg.num_steps` and `cfg.quantize` of the sampler config; its Karras schedule, solver,
    churn and `initial_noise` keys do not apply (the start is always N(0, I), as in the branch).
    With `cfg.quantize` the output is put on 8 bits with `quantization` (the branch's `.byte()`
    is "truncate"), else only clamped to [-1, 1].
    """

    def __init__(self, denoiser: NoisePredictor, cfg: SamplerConfig, *, quantization: str) -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")
        self.denoiser = denoiser
        self.cfg = cfg
        self.quantization = quantization
        self.num_timesteps = int(denoiser.alphas_cumprod.shape[0])
        # Validates num_steps; one step does not use the grid (see `one_step`).
        self.timesteps = inference_timesteps(cfg.num_steps, self.num_timesteps)

    @torch.no_grad()
    def sample(self, prev_obs: Tensor, prev_act: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """prev_obs float (B, L, 3, H, W) in [-1, 1], prev_act long (B, L) -> next_obs (B, 3, H, W)."""
        return self.integrate(self.draw_noise(prev_obs, generator), prev_obs, prev_act)

    def draw_noise(self, prev_obs: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """All random numbers of one `sample`, in the order it uses them: the start x ~ N(0, I)
        (B, 3, H, W), then one N(0, I) per multi-step `step()` with t > 0 (as DiffusionSampler.draw_noise)."""
        b, _, c, h, w = prev_obs.shape
        noisy_steps = 0 if self.cfg.num_steps == 1 else sum(t > 0 for t in self.timesteps)
        return [torch.randn((b, c, h, w), generator=generator, device=prev_obs.device, dtype=torch.float32)
                for _ in range(1 + noisy_steps)]

    @torch.no_grad()
    def integrate(self, noise: list[Tensor], prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """The next frame from `draw_noise`'s numbers: deterministic."""
        x = noise[0]
        if self.cfg.num_steps == 1:
            x = self.one_step(x, prev_obs, prev_act)
        else:
            x = self.multi_step(x, prev_obs, prev_act, step_noise=noise[1:])
        return quantize_8bit(x, self.quantization) if self.cfg.quantize else x.clamp(-1, 1)

    def one_step(self, x: Tensor, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """The x0 estimate at t = T // 2 from pure noise (diffusion_sampler.py:33-45): the branch
        found that at t = T - 1 an epsilon model learns the identity (paper section 5.1)."""
        t = torch.full((x.shape[0],), self.num_timesteps // 2, dtype=torch.long, device=x.device)
        eps = self.denoiser.predict_noise(x, t, prev_obs, prev_act)
        return predict_x0(x, eps, self.denoiser.alphas_cumprod.to(x.device)[t])

    def multi_step(self, x: Tensor, prev_obs: Tensor, prev_act: Tensor, step_noise: list[Tensor]) -> Tensor:
        """`step()` over the `set_timesteps(n)` grid (diffusion_sampler.py:52-58); `step_noise`
        holds the N(0, I) of each step with t > 0, in order."""
        alphas_cumprod = self.denoiser.alphas_cumprod.to(x.device)
        n = self.cfg.num_steps
        noise = iter(step_noise)
        for t in self.timesteps:
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = self.denoiser.predict_noise(x, t_batch, prev_obs, prev_act)
            x = ddpm_step(x, eps, t, previous_timestep(t, n, self.num_timesteps), alphas_cumprod,
                          noise=next(noise) if t > 0 else None)
        return x
