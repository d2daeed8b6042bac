"""The world model's denoiser D (DESIGN 3.2): next frame given the last L frames and actions.

Two formulations share the U-Net F and one interface, `denoise(x_noisy, sigma, ...) -> x0 estimate`
in the variance-exploding parameterisation x_noisy = x0 + sigma * noise, so that one sampler serves
both (DESIGN's EDM-vs-DDPM ablation):

- "edm" (the paper): Karras et al. preconditioning with offset noise. With
  s = sqrt(sigma^2 + sigma_offset^2): c_in = 1/sqrt(s^2 + sd^2), c_skip = sd^2/(s^2 + sd^2),
  c_out = s*sd/sqrt(s^2 + sd^2), c_noise = log(s)/4. Training sigmas are log-normal, clipped.
- "ddpm": F predicts the noise epsilon (Ho et al. 2020, linear betas 1e-4..0.02 over
  `ddpm_num_timesteps`). Written in the same form: c_skip = 1, c_out = -sigma,
  c_in = 1/sqrt(1 + sigma^2) (the variance-preserving input), c_noise = t(sigma)/T with
  sigma_t = sqrt((1 - alpha_bar_t)/alpha_bar_t); training draws t uniformly. Euler steps on this
  denoiser are DDIM steps. No offset noise (it is part of DIAMOND's EDM recipe).

In both, the training target of F is (x0 - c_skip * x_noisy) / c_out and the loss is its MSE,
masked where the target frame is padding, averaged over `num_autoregressive_steps` + 1 targets
per segment, later ones conditioned on D's own 8-bit estimates (`compute_loss`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError, DenoiserConfig
from diamond.models.blocks import FourierFeatures
from diamond.models.unet import UNet
from diamond.sampler import quantize_8bit

# DDPM's linear beta schedule (Ho et al. 2020); only the DDPM ablation reads these.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02


class SegmentLike(Protocol):
    """What the losses read from `diamond.data.Segment.to_torch()`."""

    obs: Tensor  # (B, N+1, 3, H, W) float in [-1, 1]
    act: Tensor  # (B, N) long
    rew: Tensor
    terminated: Tensor
    truncated: Tensor
    mask: Tensor  # (B, N+1) bool


def edm_conditioners(sigma: Tensor, sigma_data: float, sigma_offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_in, c_out, c_skip, c_noise) of EDM with offset noise; all shaped like `sigma`."""
    s2 = sigma**2 + sigma_offset**2
    c_in = 1 / (s2 + sigma_data**2).sqrt()
    c_skip = sigma_data**2 / (s2 + sigma_data**2)
    c_out = s2.sqrt() * sigma_data / (s2 + sigma_data**2).sqrt()
    c_noise = s2.sqrt().log() / 4
    return c_in, c_out, c_skip, c_noise


def ddpm_sigma_table(num_timesteps: int) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (increasing), float64."""
    betas = torch.linspace(DDPM_BETA_START, DDPM_BETA_END, num_timesteps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def ddpm_conditioners(sigma: Tensor, sigma_table: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_in, c_out, c_skip, c_noise) of an epsilon-predicting DDPM in the VE parameterisation."""
    # Continuous timestep: linear interpolation of log sigma over the table (clamped to its range).
    log_table = sigma_table.log().to(sigma.device)
    log_sigma = sigma.double().clamp(min=sigma_table[0].item(), max=sigma_table[-1].item()).log()
    idx = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    lo, hi = log_table[idx - 1], log_table[idx]
    t = (idx - 1) + (log_sigma - lo) / (hi - lo)
    c_noise = (t / len(log_table)).to(sigma.dtype)
    c_in = 1 / (1 + sigma**2).sqrt()
    return c_in, -sigma, torch.ones_like(sigma), c_noise


class Denoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig, num_actions: int) -> None:
        super().__init__()
        if cfg.formulation not in ("edm", "ddpm"):
            raise ConfigError(f"denoiser.formulation: {cfg.formulation!r} is not 'edm' or 'ddpm'")
        L = cfg.num_conditioning_frames
        if L < 1 or cfg.cond_channels % L != 0:
            raise ConfigError(
                f"denoiser.cond_channels ({cfg.cond_channels}) must be a multiple of "
                f"num_conditioning_frames ({L}): each past action gets cond_channels/L dims"
            )
        self.cfg = cfg
        self.num_actions = num_actions
        self.noise_emb = FourierFeatures(cfg.cond_channels)
        self.act_emb = nn.Embedding(num_actions, cfg.cond_channels // L)
        self.cond_proj = nn.Sequential(
            nn.Linear(cfg.cond_channels, cfg.cond_channels),
            nn.SiLU(),
            nn.Linear(cfg.cond_channels, cfg.cond_channels),
        )
        self.net = UNet(
            in_channels=3 * (L + 1),
            out_channels=3,
            cond_channels=cfg.cond_channels,
            channels=cfg.channels,
            depths=cfg.depths,
            attention=cfg.attention,
            group_channels=cfg.num_groups_channels,
        )
        if cfg.formulation == "ddpm":
            self.register_buffer("ddpm_sigmas", ddpm_sigma_table(cfg.ddpm_num_timesteps), persistent=False)

    @property
    def num_conditioning_frames(self) -> int:
        return self.cfg.num_conditioning_frames

    def conditioners(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.cfg.formulation == "edm":
            return edm_conditioners(sigma, self.cfg.sigma_data, self.cfg.sigma_offset_noise)
        return ddpm_conditioners(sigma, self.ddpm_sigmas)

    def network(self, x_in: Tensor, c_noise: Tensor, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """F(c_in x, c_noise, past frames / sigma_data, past actions)."""
        b = x_in.shape[0]
        cond = self.noise_emb(c_noise) + self.act_emb(prev_act).reshape(b, -1)
        cond = self.cond_proj(cond)
        frames = prev_obs.reshape(b, -1, *prev_obs.shape[-2:]) / self.cfg.sigma_data
        return self.net(torch.cat([frames, x_in], dim=1), cond)

    def denoise(self, noisy_next_obs: Tensor, sigma: Tensor | float, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, ...): the estimate of the clean next frame."""
        sigma = torch.as_tensor(sigma, dtype=noisy_next_obs.dtype, device=noisy_next_obs.device)
        sigma = sigma.expand(noisy_next_obs.shape[0])
        c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in self.conditioners(sigma))
        out = self.network(c_in * noisy_next_obs, c_noise.flatten(), prev_obs, prev_act)
        return c_skip * noisy_next_obs + c_out * out.float()

    def sample_training_sigma(self, n: int, device: torch.device) -> Tensor:
        cfg = self.cfg
        if cfg.formulation == "edm":
            log_sigma = torch.randn(n, device=device) * cfg.train_log_sigma_scale + cfg.train_log_sigma_loc
            return log_sigma.exp().clamp(cfg.train_sigma_min, cfg.train_sigma_max)
        t = torch.randint(0, cfg.ddpm_num_timesteps, (n,), device=device)
        return self.ddpm_sigmas.to(device)[t].float()

    def compute_loss(self, seg: SegmentLike) -> tuple[Tensor, dict[str, float]]:
        """Masked denoising loss, trained autoregressively over k = num_autoregressive_steps.

        Every window of L + 1 + k consecutive frames of the segment (one window for segments of
        `cfg.training_segment_steps` steps) gives k + 1 targets, frames L..L+k. Target i is
        denoised from the L frames before it, in which every earlier target (frames L..L+i-1) is
        replaced by D's own one-shot estimate of it: c_skip x + c_out F at that step's noise,
        detached, clamped and quantized to 8 bits (`quantization`). Each step draws its own
        sigma and noise. The loss is the mean over the k + 1 steps of each step's masked loss,
        as in the official denoiser's forward (src/models/diffusion/denoiser.py); k = 0 is plain
        teacher forcing.
        """
        L = self.cfg.num_conditioning_frames
        k = self.cfg.num_autoregressive_steps
        n = seg.act.shape[1]
        if n < L + k:
            raise ValueError(
                f"denoiser needs segments of at least {L + k} steps "
                f"({L} conditioning + {k} autoregressive), got {n}"
            )
        # Windows of L+1+k frames (L conditioning frames and k+1 targets), flattened into the batch.
        obs = seg.obs.unfold(1, L + 1 + k, 1).permute(0, 1, 5, 2, 3, 4).flatten(0, 1)  # (B', L+1+k, 3, H, W)
        act = seg.act.unfold(1, L + k, 1)[:, : n - L - k + 1].flatten(0, 1)  # (B', L+k)
        mask = seg.mask.unfold(1, L + 1 + k, 1).flatten(0, 1)  # (B', L+1+k)
        # The frames the contexts read; targets are overwritten by D's estimates as it goes.
        frames = obs.clone() if k > 0 else obs
        losses = []
        for i in range(k + 1):
            # Padding before the episode start becomes zeros, as in imagination from a short history.
            prev_obs = frames[:, i : i + L] * mask[:, i : i + L, None, None, None]
            target_obs = obs[:, L + i]
            weight = mask[:, L + i].float()

            b = target_obs.shape[0]
            sigma = self.sample_training_sigma(b, target_obs.device)
            noise = torch.randn_like(target_obs) * sigma[:, None, None, None]
            if self.cfg.formulation == "edm":
                noise = noise + self.cfg.sigma_offset_noise * torch.randn(b, 3, 1, 1, device=target_obs.device)
            x_noisy = target_obs + noise
            c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in self.conditioners(sigma))
            out = self.network(c_in * x_noisy, c_noise.flatten(), prev_obs, act[:, i : i + L]).float()
            target = (target_obs - c_skip * x_noisy) / c_out
            per_sample = F.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
            losses.append((per_sample * weight).sum() / weight.sum().clamp(min=1))
            if i < k:
                with torch.no_grad():
                    frames[:, L + i] = quantize_8bit(c_skip * x_noisy + c_out * out.detach(), self.cfg.quantization)
        loss = losses[0] if k == 0 else torch.stack(losses).mean()
        return loss, {"loss": loss.item()}
