"""EDM preconditioning, the DDPM variant, the masked loss and the U-Net's size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diamond.config import ConfigError, DenoiserConfig, params_from_dict
from diamond.data import Segment
from diamond.models.denoiser import Denoiser, ddpm_conditioners, ddpm_sigma_table, edm_conditioners

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tiny_params, **kw) -> DenoiserConfig:
    return dataclasses.replace(tiny_params.world_model.denoiser, **kw)


def random_segment(b: int, n: int, size: int = 16, seed: int = 0) -> Segment:
    rng = np.random.default_rng(seed)
    return Segment(
        obs=rng.integers(0, 256, (b, n + 1, 3, size, size), dtype=np.uint8),
        act=rng.integers(0, 4, (b, n)).astype(np.int64),
        rew=np.zeros((b, n), np.float32),
        terminated=np.zeros((b, n), bool),
        truncated=np.zeros((b, n), bool),
        mask=np.ones((b, n + 1), bool),
    )


def test_edm_conditioners_match_formulas():
    sigma = torch.tensor([0.002, 0.5, 5.0], dtype=torch.float64)
    sd, off = 0.5, 0.3
    c_in, c_out, c_skip, c_noise = edm_conditioners(sigma, sd, off)
    s = (sigma**2 + off**2).sqrt()
    assert torch.allclose(c_in, 1 / (s**2 + sd**2).sqrt())
    assert torch.allclose(c_skip, sd**2 / (s**2 + sd**2))
    assert torch.allclose(c_out, s * c_skip.sqrt())
    assert torch.allclose(c_noise, s.log() / 4)
    # EDM's design: D's total variance split, c_skip + (c_out / sd)^2 = 1.
    assert torch.allclose(c_skip + (c_out / sd) ** 2, torch.ones(3, dtype=torch.float64))


def test_edm_unit_variance_input_and_target():
    # For data of std sigma_data and noise of std s (offset included), c_in x and the F target
    # both have unit variance: the point of the preconditioning.
    g = torch.Generator().manual_seed(0)
    sd, off = 0.5, 0.3
    for sig in (0.01, 0.4, 3.0):
        x0 = torch.randn(200_000, generator=g, dtype=torch.float64) * sd
        sigma = torch.tensor(sig, dtype=torch.float64)
        noise = torch.randn(200_000, generator=g, dtype=torch.float64) * sig + off * torch.randn(200_000, generator=g, dtype=torch.float64)
        x = x0 + noise
        c_in, c_out, c_skip, _ = edm_conditioners(sigma, sd, off)
        assert (c_in * x).std().item() == pytest.approx(1.0, abs=0.01)
        assert ((x0 - c_skip * x) / c_out).std().item() == pytest.approx(1.0, abs=0.01)


def test_ddpm_conditioners_recover_x0_from_true_noise():
    table = ddpm_sigma_table(1000)
    assert torch.all(table[1:] > table[:-1])
    sigma = table[[0, 10, 500, 999]]
    c_in, c_out, c_skip, c_noise = ddpm_conditioners(sigma, table)
    assert torch.allclose(c_noise, torch.tensor([0, 10, 500, 999], dtype=torch.float64) / 1000, atol=1e-9)
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = x0 + sigma * eps
    assert torch.allclose(c_skip * x + c_out * eps, x0)  # F = eps gives D = x0
    # The variance-preserving input: c_in x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.
    alpha_bar = 1 / (1 + sigma**2)
    assert torch.allclose(c_in * x, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)


def test_fresh_denoiser_is_c_skip_times_input(tiny_params):
    den = Denoiser(tiny_cfg(tiny_params), num_actions=4)
    x = torch.randn(2, 3, 16, 16)
    prev = torch.randn(2, 4, 3, 16, 16)
    act = torch.zeros(2, 4, dtype=torch.long)
    _, _, c_skip, _ = edm_conditioners(torch.tensor(1.0), 0.5, 0.3)
    assert torch.allclose(den.denoise(x, 1.0, prev, act), c_skip * x)  # zero-initialised output conv


def test_loss_is_masked_on_padded_targets(tiny_params):
    torch.manual_seed(0)
    den = Denoiser(tiny_cfg(tiny_params), num_actions=4)
    # Make F non-zero so that the loss depends on its inputs.
    torch.nn.init.normal_(den.net.conv_out.weight, std=0.1)
    seg = random_segment(4, 4)
    seg.mask[2:, :] = False  # samples 2 and 3 are entirely padding (targets included)
    other = random_segment(4, 4, seed=1)
    seg2 = dataclasses.replace(seg, obs=seg.obs.copy())
    seg2.obs[2:] = other.obs[2:]  # change only the padded samples
    torch.manual_seed(1)
    loss1, m = den.compute_loss(seg.to_torch())
    torch.manual_seed(1)
    loss2, _ = den.compute_loss(seg2.to_torch())
    assert loss1.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert m["loss"] > 0
    # Unpadded, the changed samples do count.
    seg2.mask[:] = True
    torch.manual_seed(1)
    loss3, _ = den.compute_loss(seg2.to_torch())
    assert loss3.item() != pytest.approx(loss1.item(), rel=1e-3)


def test_loss_on_longer_segments_uses_every_window(tiny_params):
    den = Denoiser(tiny_cfg(tiny_params), num_actions=4)
    loss, _ = den.compute_loss(random_segment(2, 6).to_torch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least 4 steps"):
        den.compute_loss(random_segment(2, 3).to_torch())


def test_ddpm_variant_trains_same_network(tiny_params):
    edm = Denoiser(tiny_cfg(tiny_params), num_actions=4)
    ddpm = Denoiser(tiny_cfg(tiny_params, formulation="ddpm"), num_actions=4)
    assert sum(p.numel() for p in edm.parameters()) == sum(p.numel() for p in ddpm.parameters())
    loss, _ = ddpm.compute_loss(random_segment(2, 4).to_torch())
    loss.backward()
    # A fresh DDPM network outputs eps = 0, so its loss is E[eps^2] = 1.
    assert loss.item() == pytest.approx(1.0, abs=0.1)


def test_paper_unet_size():
    paper = params_from_dict(yaml.safe_load((ROOT / "configs/paper.yaml").read_text()))
    den = Denoiser(paper.world_model.denoiser, num_actions=18)
    n = sum(p.numel() for p in den.parameters())
    print(f"paper denoiser parameters: {n:,}")
    assert 4.0e6 < n < 4.8e6  # the paper: about 4.4M


def test_bad_config_is_one_clear_error(tiny_params):
    with pytest.raises(ConfigError, match="cond_channels"):
        Denoiser(tiny_cfg(tiny_params, cond_channels=30), num_actions=4)
    with pytest.raises(ConfigError, match="same length"):
        Denoiser(tiny_cfg(tiny_params, depths=[1]), num_actions=4)
