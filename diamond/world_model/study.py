"""The world-model study of the DIAMOND paper, section 5.1 (Alonso et al., NeurIPS 2024): how the
diffusion formulation (EDM vs DDPM) and the number of denoising steps change the compounding
error of long open-loop imaginations, with everything else fixed.

Here, per variant (formulation, steps) and seed:
- the denoiser D alone (frames are what is measured; R plays no part) is trained on a fixed,
  versioned episode store with the same number of steps, batch and seed for every variant;
- the store's last `heldout_episodes` finished episodes are kept out of training; on them D
  imagines open loop from L real frames, fed the real actions, never seeing a real frame again
  (`diamond.world_model.fidelity`'s rollouts), as far as each episode allows;
- each imagined frame is compared with the real one at the same step: MSE and PSNR (pixels in
  [0, 1]) and SSIM (Wang et al. 2004, torchmetrics' Gaussian-window implementation), beside the
  same numbers for the "repeat the last real frame" baseline.
`diamond.results.study_report` turns the per-job arrays into the tables and figures. Nothing here knows
of DVC, Snakemake or MLflow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diamond.config import ConfigError, StudyVariant, WorldModelConfig, validate_variant
from diamond.data import Episode, EpisodeStore, SegmentSampler
from diamond.data.frames import to_float, to_uint8
from diamond.data.sampler import denoiser_placement
from diamond.progress import Progress
from diamond.results.study_errors import METRICS
from diamond.seeds import STUDY_SEGMENTS, stream_rng
from diamond.training import Trainer, training_step
from diamond.world_model.denoiser import Denoiser
from diamond.world_model.fidelity import PSNR_MAX_DB, imagine_open_loop, rollout_windows

ROLLOUT_BATCH = 16  # rollouts imagined at once: bounds the memory of 1000-step horizons


class EpisodeSubset:
    """Some episodes of a store, seen as a store by `SegmentSampler` (len, [], lengths, root)."""

    def __init__(self, store: EpisodeStore, indices: list[int]) -> None:
        self.store, self.indices, self.root = store, indices, store.root
        self.lengths = store.lengths[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Episode:
        return self.store[self.indices[i]]


def heldout_split(store: EpisodeStore, num_heldout: int, context: int) -> tuple[list[int], list[int]]:
    """(training, held-out) episode indices: the last `num_heldout` finished episodes longer than
    the context are held out (the newest, closest to the policy at the end of collection); every
    other episode, the one in progress included, trains D."""
    candidates = [i for i in range(len(store)) if not store.in_progress(i) and store.lengths[i] > context - 1]
    heldout = candidates[-num_heldout:] if num_heldout <= len(candidates) else []
    train = [i for i in range(len(store)) if i not in set(heldout)]
    if len(heldout) < num_heldout or not train:
        raise ConfigError(
            f"study.heldout_episodes: {num_heldout} held-out episodes asked, but {store.root} has "
            f"{len(candidates)} finished episodes of more than {context - 1} steps among {len(store)} (one must stay for training)"
        )
    return train, heldout


def variant_config(wm: WorldModelConfig, variant: StudyVariant) -> WorldModelConfig:
    """world_model with the variant's formulation and sampling steps, all else unchanged."""
    validate_variant(variant, wm.denoiser.ddpm_num_timesteps, f"variant {variant.name!r}")
    return dataclasses.replace(
        wm,
        denoiser=dataclasses.replace(wm.denoiser, formulation=variant.formulation),
        sampler=dataclasses.replace(wm.sampler, num_steps=variant.num_steps),
    )


def train_denoiser(
    cfg: WorldModelConfig,
    episodes: EpisodeSubset,
    num_actions: int,
    steps: int,
    seed: int,
    device: torch.device,
    prepare: Callable[[Denoiser], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    weights: tuple[float, ...] | None = None,
) -> Denoiser:
    """D trained for `steps` steps on segments of `episodes`, initialised and sampled from `seed`
    alone, so variants differ only in themselves. `prepare` runs on the fresh model (memory
    layout, compilation); `on_step` gets each step's metrics. `weights`: the segment sampler's
    recency weights; None (the study) is the official static-dataset mode, every step equally
    likely (config/trainer.yaml static_dataset.ignore_sample_weights: True)."""
    torch.manual_seed(seed)
    denoiser = Denoiser(cfg.denoiser, num_actions).to(device)
    if prepare is not None:
        prepare(denoiser)
    trainer = Trainer(denoiser, cfg.denoiser_optimizer)
    segments = SegmentSampler(episodes, stream_rng(seed, STUDY_SEGMENTS), weights=weights,  # type: ignore[arg-type]
                              placement=denoiser_placement(cfg.denoiser))
    denoiser.train()
    progress = Progress(f"study: {cfg.denoiser.formulation} denoiser, seed {seed}", steps)
    for step in range(steps):
        seg = segments.sample(cfg.batch_size, cfg.denoiser.training_segment_steps).to_torch(device)
        metrics = training_step(trainer, denoiser.compute_loss, seg)
        if on_step is not None:
            on_step(step + 1, metrics)
        progress.update()
    progress.close()
    return denoiser.eval()


SSIM_CHUNK = 512  # frames per SSIM call: torchmetrics holds several padded copies of its inputs


def frame_errors(imagined: Tensor, real: Tensor) -> dict[str, Tensor]:
    """Per-frame MSE, PSNR (dB, capped at PSNR_MAX_DB for identical frames) and SSIM of frames
    (N, 3, h, w) in [0, 1]; each result has shape (N,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = imagined.float(), real.float()
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    psnr = torch.where(mse > 0, 10 * torch.log10(1 / mse.clamp(min=1e-30)), torch.full_like(mse, PSNR_MAX_DB))
    ssim = [structural_similarity_index_measure(a[i : i + SSIM_CHUNK], b[i : i + SSIM_CHUNK], data_range=1.0, reduction="none")
            for i in range(0, len(a), SSIM_CHUNK)]
    return {"mse": mse, "psnr": psnr.clamp(max=PSNR_MAX_DB), "ssim": torch.cat(ssim) if ssim else mse.new_zeros(0)}


def masked_errors(imagined: np.ndarray, real: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """frame_errors of uint8 frames (B, H, 3, h, w) where `valid` (B, H) holds, 0 elsewhere: (B, H) arrays.
    Only the valid frames are compared (most of a 1000-step window lies past the episode ends)."""
    rows, steps = np.nonzero(valid)
    errs = frame_errors(torch.from_numpy(imagined[rows, steps]).float() / 255, torch.from_numpy(real[rows, steps]).float() / 255)
    out = {}
    for k in METRICS:
        full = np.zeros(valid.shape, np.float64)
        full[rows, steps] = errs[k].double().numpy()
        out[k] = full
    return out


def repeat_last_errors(frames: np.ndarray, valid: np.ndarray, context: int) -> dict[str, np.ndarray]:
    """The baseline's per-step errors: the last real frame (index context - 1) against each later
    one; frames uint8 (B, L + H, 3, h, w), valid (B, H) -> (B, H) arrays."""
    real = frames[:, context:]
    last = np.broadcast_to(frames[:, context - 1 : context], real.shape)
    return masked_errors(last, real, valid)


def strip_rollout(valid: np.ndarray) -> int:
    """The rollout shown in the frame strip: the one that runs longest (the first such)."""
    return int(valid.sum(1).argmax())


@torch.no_grad()
def open_loop_errors(
    sampler: Any,
    episodes: list[Episode],
    context: int,
    horizons: list[int],
    rollouts_per_episode: int,
    device: torch.device,
    seed: int,
) -> dict[str, np.ndarray]:
    """Open-loop rollouts of up to max(horizons) steps on `episodes`; every array the report needs:
    `valid` (R, H), `model_<metric>` and `repeat_last_<metric>` (R, H) (0 where not valid),
    `strip_horizons` (K,), `strip_real` and `strip_imagined` (K, 3, h, w) uint8 and `strip_context`
    (3, h, w): the longest rollout's frames at the horizons it reaches."""
    horizon = max(horizons)
    data = rollout_windows(episodes, context, horizon, starts_per_episode=rollouts_per_episode)
    horizon = int(data["valid"].sum(1).max())  # no rollout goes further: stop there
    data = {"frames": data["frames"][:, : context + horizon], "actions": data["actions"][:, : context + horizon - 1],
            "valid": data["valid"][:, :horizon]}
    generator = torch.Generator(device=device).manual_seed(seed)
    imagined = np.concatenate([
        to_uint8(imagine_open_loop(
            sampler, to_float(data["frames"][i : i + ROLLOUT_BATCH], device),
            torch.from_numpy(data["actions"][i : i + ROLLOUT_BATCH]).to(device), context, horizon, generator,
            torch.from_numpy(data["valid"][i : i + ROLLOUT_BATCH]).to(device),
        ))
        for i in range(0, len(data["frames"]), ROLLOUT_BATCH)
    ])
    out: dict[str, np.ndarray] = {"valid": data["valid"]}
    model = masked_errors(imagined, data["frames"][:, context:], data["valid"])
    baseline = repeat_last_errors(data["frames"], data["valid"], context)
    for k in METRICS:
        out[f"model_{k}"], out[f"repeat_last_{k}"] = model[k], baseline[k]
    keep = strip_rollout(data["valid"])
    shown = np.array([h for h in horizons if h <= int(data["valid"][keep].sum())], dtype=np.int64)
    out.update(strip_horizons=shown, strip_real=data["frames"][keep, context + shown - 1],
               strip_imagined=imagined[keep, shown - 1], strip_context=data["frames"][keep, context - 1])
    return out


