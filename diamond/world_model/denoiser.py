"""The world model's denoiser D (docs/architecture.md §3.2): next frame given the last L frames and actions.

Two formulations share the U-Net F (same parameters, same checkpoint layout):

- "edm" (the paper): Karras et al. preconditioning with offset noise, D(x; sigma) = c_skip x +
  c_out F(c_in x, c_noise, past frames / sigma_data, past actions). With
  s = sqrt(sigma^2 + sigma_offset^2): c_in = 1/sqrt(s^2 + sd^2), c_skip = sd^2/(s^2 + sd^2),
  c_out = s*sd/sqrt(s^2 + sd^2), c_noise = log(s)/4. Training sigmas are log-normal, clipped;
  F's target is (x0 - c_skip x_noisy) / c_out. Sampled by `diamond.world_model.sampler.DiffusionSampler`.
- "ddpm" (the paper's ablation, section 5.1, as the official `ddpm` branch does it,
  ddpm:src/models/diffusion/denoiser.py:22-57): F predicts the noise epsilon of
  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) epsilon on the linear schedule of
  `diamond.world_model.ddpm` (T = `ddpm_num_timesteps`). F reads x_t and the past frames as they are (no
  c_in, no division by sigma_data) and c_noise = (t + 1)/T. Training draws t uniformly in
  0..T-1 and epsilon = N(0, I) + `sigma_offset_noise` * N(0, I) per sample and channel: the
  offset noise is in x_t and in the target. Sampled by `diamond.world_model.ddpm.DDPMSampler`.

In both, the loss is the MSE of F's output against its target, masked where the target frame
is padding, averaged over `num_autoregressive_steps` + 1 targets per segment, later ones
conditioned on D's own 8-bit estimates (`compute_loss`). The `ddpm` branch trains without
autoregressive steps (num_autoregressive_steps: 0 reproduces it).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diamond.config import ConfigError, DenoiserConfig
from diamond.models.blocks import FourierFeatures
from diamond.models.unet import UNet
from diamond.world_model import ddpm
from diamond.world_model.sampler import quantize_8bit

FORMULATIONS = ("edm", "ddpm")


class SegmentLike(Protocol):
    """What the losses read from `diamond.data.Segment.to_torch()`."""

    obs: Tensor  # (B, N+1, 3, H, W) float in [-1, 1]
    act: Tensor  # (B, N) long
    rew: Tensor
    terminated: Tensor
    truncated: Tensor
    mask: Tensor  # (B, N+1) bool


# One training target's inputs: F's noisy input, its c_noise, F's target, and the map from F's
# output to the x0 estimate that autoregressive steps feed back.
TrainingInputs = tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]


def edm_conditioners(sigma: Tensor, sigma_data: float, sigma_offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_in, c_out, c_skip, c_noise) of EDM with offset noise; all shaped like `sigma`."""
    s2 = sigma**2 + sigma_offset**2
    c_in = 1 / (s2 + sigma_data**2).sqrt()
    c_skip = sigma_data**2 / (s2 + sigma_data**2)
    c_out = s2.sqrt() * sigma_data / (s2 + sigma_data**2).sqrt()
    c_noise = s2.sqrt().log() / 4
    return c_in, c_out, c_skip, c_noise


class Denoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig, num_actions: int) -> None:
        super().__init__()
        if cfg.formulation not in FORMULATIONS:
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
            # Not persistent: a function of the config, so checkpoints keep the EDM layout.
            self.register_buffer("alphas_cumprod", ddpm.linear_alphas_cumprod(cfg.ddpm_num_timesteps), persistent=False)

    @property
    def num_conditioning_frames(self) -> int:
        return self.cfg.num_conditioning_frames

    def conditioners(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM's (c_in, c_out, c_skip, c_noise) at noise level sigma."""
        self._require("edm", "conditioners")
        return edm_conditioners(sigma, self.cfg.sigma_data, self.cfg.sigma_offset_noise)

    def _require(self, formulation: str, what: str) -> None:
        if self.cfg.formulation != formulation:
            raise RuntimeError(f"Denoiser.{what} is for formulation {formulation!r}, not {self.cfg.formulation!r}")

    def network(self, x_in: Tensor, c_noise: Tensor, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """F(x_in, c_noise, past frames, past actions). EDM divides the past frames by sigma_data;
        the ddpm branch feeds them as they are (ddpm:src/models/diffusion/denoiser.py:45-53)."""
        b = x_in.shape[0]
        cond = self.noise_emb(c_noise) + self.act_emb(prev_act).reshape(b, -1)
        cond = self.cond_proj(cond)
        frames = prev_obs.reshape(b, -1, *prev_obs.shape[-2:])
        if self.cfg.formulation == "edm":
            frames = frames / self.cfg.sigma_data
        return self.net(torch.cat([frames, x_in], dim=1), cond)

    def denoise(self, noisy_next_obs: Tensor, sigma: Tensor | float, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """EDM's D(x; sigma) = c_skip x + c_out F(c_in x, ...): the estimate of the clean next frame."""
        self._require("edm", "denoise")
        sigma = torch.as_tensor(sigma, dtype=noisy_next_obs.dtype, device=noisy_next_obs.device)
        sigma = sigma.expand(noisy_next_obs.shape[0])
        c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in self.conditioners(sigma))
        out = self.network(c_in * noisy_next_obs, c_noise.flatten(), prev_obs, prev_act)
        return c_skip * noisy_next_obs + c_out * out.float()

    def predict_noise(self, x_t: Tensor, t: Tensor, prev_obs: Tensor, prev_act: Tensor) -> Tensor:
        """DDPM's epsilon estimate at integer timesteps t (B,), as the branch's forward
        (ddpm:src/models/diffusion/denoiser.py:33-36): F(x_t, (t + 1)/T, ...)."""
        self._require("ddpm", "predict_noise")
        c_noise = ddpm.c_noise(t, self.cfg.ddpm_num_timesteps)
        return self.network(x_t, c_noise, prev_obs, prev_act).float()

    def sample_training_sigma(self, n: int, device: torch.device) -> Tensor:
        """EDM's training noise levels: log-normal, clipped."""
        self._require("edm", "sample_training_sigma")
        cfg = self.cfg
        log_sigma = torch.randn(n, device=device) * cfg.train_log_sigma_scale + cfg.train_log_sigma_loc
        return log_sigma.exp().clamp(cfg.train_sigma_min, cfg.train_sigma_max)

    def edm_training_draws(self, target_obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The random draws of one EDM training target, in this order: sigma (B,), the pixel noise
        N(0, I) shaped like `target_obs`, the offset noise N(0, I) of shape (B, 3, 1, 1). The official
        code draws the offset before the pixel noise (src/models/diffusion/denoiser.py:61-64);
        tests/test_official_updates.py replaces this method to feed both codes the same draws."""
        b = target_obs.shape[0]
        sigma = self.sample_training_sigma(b, target_obs.device)
        return sigma, torch.randn_like(target_obs), torch.randn(b, 3, 1, 1, device=target_obs.device)

    def edm_training_inputs(self, target_obs: Tensor) -> TrainingInputs:
        """x_noisy = x0 + sigma N(0, I) + offset noise; F's target (x0 - c_skip x_noisy) / c_out."""
        sigma, normal, offset_normal = self.edm_training_draws(target_obs)
        noise = normal * sigma[:, None, None, None]
        noise = noise + self.cfg.sigma_offset_noise * offset_normal
        x_noisy = target_obs + noise
        c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in self.conditioners(sigma))
        target = (target_obs - c_skip * x_noisy) / c_out
        return c_in * x_noisy, c_noise.flatten(), target, lambda out: c_skip * x_noisy + c_out * out

    def ddpm_training_inputs(self, target_obs: Tensor) -> TrainingInputs:
        """x_t of the branch's compute_loss (ddpm:src/models/diffusion/denoiser.py:48-55); F's
        target is the whole noise, offset included. Draws in the branch's order: offset, noise, t."""
        b, c = target_obs.shape[:2]
        device = target_obs.device
        offset = self.cfg.sigma_offset_noise * torch.randn(b, c, 1, 1, device=device)
        eps = offset + torch.randn_like(target_obs)
        t = torch.randint(0, self.cfg.ddpm_num_timesteps, (b,), device=device)
        alpha_bar = self.alphas_cumprod[t]
        x_t = ddpm.add_noise(target_obs, eps, alpha_bar)
        c_noise = ddpm.c_noise(t, self.cfg.ddpm_num_timesteps)
        return x_t, c_noise, eps, lambda out: ddpm.predict_x0(x_t, out, alpha_bar)

    def compute_loss(self, seg: SegmentLike) -> tuple[Tensor, dict[str, float]]:
        """`loss(seg)` and its value as a float (the one host read of a training step's loss)."""
        loss = self.loss(seg)
        return loss, {"loss": loss.item()}

    def _padding(self, obs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(window frames, context mask): what the targets are and which frames a context reads as
        they are (the others become zeros). `zeroed` (ours): the frames as stored and the padding
        mask, so a padding target's fed-back estimate is zeroed too. `estimate` (official,
        docs/official-parity.md D2): padding frames are zeros, as the official segments' padding
        (src/data/utils.py:18-39 make_segment), and contexts read every frame unmasked, D's estimate of
        a padding target included (src/models/diffusion/denoiser.py:101,119). Elementwise, no host
        read: the compiled step stays one graph."""
        if self.cfg.padded_target_feedback == "zeroed":
            return obs, mask
        return obs * mask[:, :, None, None, None], torch.ones_like(mask)

    def loss(self, seg: SegmentLike) -> Tensor:
        """Masked denoising loss, trained autoregressively over k = num_autoregressive_steps.

        Every window of L + 1 + k consecutive frames of the segment (one window for segments of
        `cfg.training_segment_steps` steps) gives k + 1 targets, frames L..L+k. Target i is
        denoised from the L frames before it, in which every earlier target (frames L..L+i-1) is
        replaced by D's own one-shot x0 estimate of it at that step's noise (EDM: c_skip x +
        c_out F; DDPM: (x_t - sqrt(1 - alpha_bar) F) / sqrt(alpha_bar)), detached, clamped and
        quantized to 8 bits (`quantization`). Each step draws its own noise level and noise.
        The loss is the mean over the k + 1 steps of each step's masked loss, as in the official
        denoiser's forward (src/models/diffusion/denoiser.py); k = 0 is plain teacher forcing
        (the `ddpm` branch's compute_loss). Tensors in, a tensor out, nothing read on the host:
        torch.compile(fullgraph=True) captures it whole (tests/test_compiled_step.py).
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
        obs, context_mask = self._padding(obs, mask)
        # The frames the contexts read; targets are overwritten by D's estimates as it goes.
        frames = obs.clone() if k > 0 else obs
        training_inputs = self.edm_training_inputs if self.cfg.formulation == "edm" else self.ddpm_training_inputs
        losses = []
        for i in range(k + 1):
            # Padding before the episode start becomes zeros, as in imagination from a short history
            # (a padding target's fed-back estimate too, unless `padded_target_feedback: estimate`).
            prev_obs = frames[:, i : i + L] * context_mask[:, i : i + L, None, None, None]
            weight = mask[:, L + i].float()
            x_in, c_noise, target, to_estimate = training_inputs(obs[:, L + i])
            out = self.network(x_in, c_noise, prev_obs, act[:, i : i + L]).float()
            per_sample = F.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
            losses.append((per_sample * weight).sum() / weight.sum().clamp(min=1))
            if i < k:
                with torch.no_grad():
                    frames[:, L + i] = quantize_8bit(to_estimate(out.detach()), self.cfg.quantization)
        return losses[0] if k == 0 else torch.stack(losses).mean()
