"""EDM preconditioning, the masked loss and the U-Net's size (DDPM: tests/test_ddpm.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diamond.config import ConfigError, DenoiserConfig, params_from_dict
from diamond.data import Segment
from diamond.world_model.denoiser import Denoiser, edm_conditioners
from diamond.world_model.sampler import quantize_8bit
from conftest import tiny_params_dict

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


def test_fresh_denoiser_is_c_skip_times_input(tiny_params):
    den = Denoiser(tiny_cfg(tiny_params), num_actions=4)
    x = torch.randn(2, 3, 16, 16)
    prev = torch.randn(2, 4, 3, 16, 16)
    act = torch.zeros(2, 4, dtype=torch.long)
    _, c_out, c_skip, _ = edm_conditioners(torch.tensor(1.0), 0.5, 0.3)
    # Zero-initialised output conv weight; its bias keeps PyTorch's init, as in the official code.
    bias = den.net.conv_out.bias[None, :, None, None]
    assert torch.allclose(den.denoise(x, 1.0, prev, act), c_skip * x + c_out * bias, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1])
def test_loss_is_masked_on_padded_targets(tiny_params, k):
    torch.manual_seed(0)
    den = Denoiser(tiny_cfg(tiny_params, num_autoregressive_steps=k), num_actions=4)
    # Make F non-zero so that the loss depends on its inputs.
    torch.nn.init.normal_(den.net.conv_out.weight, std=0.1)
    seg = random_segment(4, 4 + k)
    seg.mask[2:, :] = False  # samples 2 and 3 are entirely padding (targets included)
    other = random_segment(4, 4 + k, seed=1)
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


@pytest.mark.parametrize("k", [0, 1, 2])
def test_loss_on_longer_segments_uses_every_window(tiny_params, k):
    cfg = tiny_cfg(tiny_params, num_autoregressive_steps=k)
    assert cfg.training_segment_steps == 4 + k
    den = Denoiser(cfg, num_actions=4)
    loss, _ = den.compute_loss(random_segment(2, 6 + k).to_torch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=f"at least {4 + k} steps"):
        den.compute_loss(random_segment(2, 3 + k).to_torch())


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


def loss_before_autoregression(den: Denoiser, seg) -> torch.Tensor:
    """compute_loss as it was before num_autoregressive_steps (teacher forcing on every window of
    L+1 frames), kept verbatim as the reference for k = 0."""
    L = den.cfg.num_conditioning_frames
    n = seg.act.shape[1]
    obs = seg.obs.unfold(1, L + 1, 1).permute(0, 1, 5, 2, 3, 4).flatten(0, 1)
    act = seg.act.unfold(1, L, 1)[:, : n - L + 1].flatten(0, 1)
    mask = seg.mask.unfold(1, L + 1, 1).flatten(0, 1)
    prev_obs = obs[:, :L] * mask[:, :L, None, None, None]
    target_obs = obs[:, L]
    weight = mask[:, L].float()
    b = target_obs.shape[0]
    sigma = den.sample_training_sigma(b, target_obs.device)
    noise = torch.randn_like(target_obs) * sigma[:, None, None, None]
    if den.cfg.formulation == "edm":
        noise = noise + den.cfg.sigma_offset_noise * torch.randn(b, 3, 1, 1, device=target_obs.device)
    x_noisy = target_obs + noise
    c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in den.conditioners(sigma))
    out = den.network(c_in * x_noisy, c_noise.flatten(), prev_obs, act).float()
    target = (target_obs - c_skip * x_noisy) / c_out
    per_sample = torch.nn.functional.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).sum() / weight.sum().clamp(min=1)


def nonzero_denoiser(cfg: DenoiserConfig) -> Denoiser:
    torch.manual_seed(0)
    den = Denoiser(cfg, num_actions=4)
    torch.nn.init.normal_(den.net.conv_out.weight, std=0.1)  # F != 0, so the estimates depend on it
    return den


def loss_and_grads(den: Denoiser, loss_fn, seg) -> tuple[torch.Tensor, list[torch.Tensor]]:
    den.zero_grad()
    torch.manual_seed(1)
    loss = loss_fn(seg)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in den.parameters() if p.grad is not None]


@pytest.mark.parametrize("steps", [4, 6])
def test_no_autoregressive_steps_is_the_former_loss_bit_for_bit(tiny_params, steps):
    den = nonzero_denoiser(tiny_cfg(tiny_params, num_autoregressive_steps=0))
    seg = random_segment(3, steps, seed=5)
    seg.mask[0, :2] = False
    seg.mask[1, :] = False
    seg = seg.to_torch()
    new, new_grads = loss_and_grads(den, lambda s: den.compute_loss(s)[0], seg)
    old, old_grads = loss_and_grads(den, lambda s: loss_before_autoregression(den, s), seg)
    assert torch.equal(new, old)
    assert len(new_grads) == len(old_grads) and all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def two_step_loss(den: Denoiser, seg) -> torch.Tensor:
    """The k = 1 loss written out by hand for segments of L + 1 steps (one window): the official
    denoiser's forward (src/models/diffusion/denoiser.py) with our masking."""
    L = den.cfg.num_conditioning_frames
    obs, act, mask = seg.obs, seg.act, seg.mask
    b = obs.shape[0]
    m = mask[:, :, None, None, None]

    def step(context: torch.Tensor, actions: torch.Tensor, target_obs: torch.Tensor, weight: torch.Tensor):
        sigma = den.sample_training_sigma(b, obs.device)
        x_noisy = target_obs + torch.randn_like(target_obs) * sigma[:, None, None, None]
        x_noisy = x_noisy + den.cfg.sigma_offset_noise * torch.randn(b, 3, 1, 1)
        c_in, c_out, c_skip, c_noise = (c[:, None, None, None] for c in den.conditioners(sigma))
        out = den.network(c_in * x_noisy, c_noise.flatten(), context, actions).float()
        err = ((out - (target_obs - c_skip * x_noisy) / c_out) ** 2).mean(dim=(1, 2, 3))
        estimate = quantize_8bit((c_skip * x_noisy + c_out * out).detach(), den.cfg.quantization)
        return (err * weight).sum() / weight.sum().clamp(min=1), estimate

    loss0, estimate = step(obs[:, :L] * m[:, :L], act[:, :L], obs[:, L], mask[:, L].float())
    context = torch.cat([obs[:, 1:L], estimate[:, None]], dim=1) * m[:, 1 : L + 1]
    loss1, _ = step(context, act[:, 1 : L + 1], obs[:, L + 1], mask[:, L + 1].float())
    return (loss0 + loss1) / 2


@pytest.mark.parametrize("quantization", ["nearest", "truncate"])
def test_autoregressive_loss_is_the_hand_written_two_step_loss(tiny_params, quantization):
    den = nonzero_denoiser(tiny_cfg(tiny_params, num_autoregressive_steps=1, quantization=quantization))
    seg = random_segment(3, den.cfg.training_segment_steps, seed=2)
    seg.mask[0, :3] = False  # padding before the start of sample 0
    seg.mask[1, :5] = False  # sample 1: the first target is padding, only the second counts
    seg = seg.to_torch()
    ours, ours_grads = loss_and_grads(den, lambda s: den.compute_loss(s)[0], seg)
    hand, hand_grads = loss_and_grads(den, lambda s: two_step_loss(den, s), seg)
    torch.testing.assert_close(ours, hand, rtol=1e-6, atol=0)
    # Same gradients: none flows through the fed-back estimate (it is detached in both).
    assert len(ours_grads) == len(hand_grads)
    for a, b in zip(ours_grads, hand_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The second target changes the loss: it is not the one-step loss.
    one_step = nonzero_denoiser(tiny_cfg(tiny_params, num_autoregressive_steps=0))
    torch.manual_seed(1)
    assert one_step.compute_loss(seg)[0].item() != pytest.approx(ours.item(), rel=1e-3)


def test_second_step_reads_the_detached_quantized_estimate(tiny_params, monkeypatch):
    den = nonzero_denoiser(tiny_cfg(tiny_params, num_autoregressive_steps=1, quantization="truncate"))
    calls = []
    network = den.network

    def recording_network(x_in, c_noise, prev_obs, prev_act):
        out = network(x_in, c_noise, prev_obs, prev_act)
        calls.append((x_in, c_noise, prev_obs, prev_act, out))
        return out

    sigmas = []
    sample_sigma = den.sample_training_sigma

    def recording_sigma(n, device):
        sigmas.append(sample_sigma(n, device))
        return sigmas[-1]

    monkeypatch.setattr(den, "network", recording_network)
    monkeypatch.setattr(den, "sample_training_sigma", recording_sigma)
    seg = random_segment(2, 5, seed=3)
    seg.mask[1, :5] = False  # sample 1: frames 0..4 are padding, so its second context is all padding
    seg = seg.to_torch()
    torch.manual_seed(0)
    loss, _ = den.compute_loss(seg)
    assert len(calls) == 2 and len(sigmas) == 2
    assert not torch.equal(sigmas[0], sigmas[1])  # a fresh noise level per step
    (x0_in, _, ctx0, _, out0), (_, _, ctx1, act1, _) = calls
    # Step 1's context: real frames 1..3, then in place of frame 4 step 0's estimate.
    assert torch.equal(ctx1[0, :3], seg.obs[0, 1:4])
    assert torch.equal(act1, seg.act[:, 1:5])
    fed_back = ctx1[0, 3]
    assert not torch.equal(fed_back, seg.obs[0, 4])
    assert not ctx1.requires_grad and not fed_back.requires_grad
    assert ctx0.requires_grad is False and out0.requires_grad  # the network itself does get gradients
    # ... which is the step-0 estimate c_skip x + c_out F, clamped and truncated to 8 bits.
    levels = (fed_back + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    c_in, c_out, c_skip, _ = (c[:, None, None, None] for c in den.conditioners(sigmas[0]))
    estimate = c_skip * (x0_in / c_in) + c_out * out0.detach()  # x_noisy recovered from c_in x_noisy
    expected = quantize_8bit(estimate, "truncate")[0]
    assert (fed_back - expected).abs().max().item() <= 2 / 255 + 1e-6  # recovery rounding: one level at most
    assert ((fed_back - expected).abs() > 1e-6).float().mean() < 0.01
    # Padding stays zero in the context, estimates of padded targets included.
    assert torch.count_nonzero(ctx1[1]) == 0
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_autoregressive_steps", -1, "num_autoregressive_steps: -1 must be >= 0"),
        ("quantization", "floor", "quantization: 'floor' is not 'nearest' or 'truncate'"),
    ],
)
def test_bad_autoregressive_and_quantization_keys_are_one_line_errors(key, value, match):
    d = tiny_params_dict()
    d["world_model"]["denoiser"][key] = value
    with pytest.raises(ConfigError, match=match):
        params_from_dict(d)
    d = tiny_params_dict()
    d["world_model"]["sampler"]["initial_noise"] = "sigma_min"
    with pytest.raises(ConfigError, match="initial_noise: 'sigma_min' is not 'unit' or 'sigma_max'"):
        params_from_dict(d)
