"""How faithful the world model's imagination is, measured on held-out real episodes.

- Held-out episodes: fresh episodes of the uniform policy in the real environment (training mode,
  so episodes end on life loss as in the training data), on an environment seed derived from the
  run seed with its own stream (diamond/seeds.py `HELDOUT`), disjoint from the collection's seed.
- Open-loop imagination: from L real frames and actions, the world model generates the next H
  frames, fed the real actions that were taken, never seeing a real frame again. Per step
  k = 1..H: MSE (pixels in [0, 1]) and PSNR (from the mean MSE) of imagined vs real frames, beside
  the same numbers for the "repeat the last real frame" baseline. Each episode gives rollouts
  starting every H steps (at most `MAX_ROLLOUTS_PER_EPISODE`, evenly spread); a rollout stops at
  its episode's end, so each step reports how many rollouts reached it.
- Reward/termination: R run on the real held-out transitions, in windows of its training segment
  length (fresh LSTM state, as in training); accuracy, per-class recall and the majority-class
  accuracy for comparison. Imagination does not take R's most likely class but samples it
  (official src/envs/world_model_env.py), so the report also gives, per class, the probability R
  puts on that class where it happened (the expected share of those steps a sample gets right)
  and where it did not, and R's log loss beside that of the best constant predictor of these
  data (the entropy of their class frequencies).
- A side-by-side GIF (real | imagined) of one open-loop rollout.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diamond.config import EnvConfig
from diamond.data import Episode, EpisodeStore
from diamond.data.frames import gif_bytes, to_float, to_uint8
from diamond.io import atomic_write_bytes
from diamond.models.reward_end import NUM_END_CLASSES, NUM_REWARD_CLASSES, RewardEndModel, reward_classes
from diamond.seeds import COLLECT_POLICY, HELDOUT, derived_seed, stream_rng
from diamond.world_model.sampler import DiffusionSampler

MAX_ROLLOUTS_PER_EPISODE = 16
REWARD_CLASS_NAMES = ("negative", "zero", "positive")
END_CLASS_NAMES = ("continue", "end")
GIF_FRAME_MS = 100


def heldout_seed(seed: int) -> int:
    return derived_seed(seed, HELDOUT)


def heldout_episodes(game: str, seed: int, env_cfg: EnvConfig, num_episodes: int, chunk_steps: int = 100) -> list[Episode]:
    """`num_episodes` fresh uniform-policy training-mode episodes of `game`, on a held-out seed."""
    from diamond.env.collector import Collector, UniformPolicy
    from diamond.env.atari import make_env, num_actions

    s = heldout_seed(seed)
    n = num_actions(game)
    tmp = Path(tempfile.mkdtemp(prefix="diamond-heldout-"))
    try:
        store = EpisodeStore(tmp / "episodes", game=game, num_actions=n)
        env = make_env(game, s, train=True, config=env_cfg)
        collector = Collector(env, UniformPolicy(n, stream_rng(s, COLLECT_POLICY)), store)
        while len(store) < num_episodes:
            collector.collect(chunk_steps)
        env.close()
        return [store[i] for i in range(num_episodes)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rollout_starts(num_steps: int, context: int, horizon: int, starts_per_episode: int | None = None) -> list[int]:
    """Steps t0 (the last real frame given) where the rollouts of one episode start.

    By default every H steps, at most MAX_ROLLOUTS_PER_EPISODE of them evenly spread. With
    `starts_per_episode` (the world-model study), that many evenly spread over every possible
    start, so short horizons get many rollouts and the first still reaches as far as the episode
    allows."""
    if starts_per_episode is None:
        starts = list(range(context - 1, num_steps, horizon))
        count = MAX_ROLLOUTS_PER_EPISODE
    else:
        starts = list(range(context - 1, num_steps))
        count = starts_per_episode
    if len(starts) > count:
        starts = [starts[i] for i in np.unique(np.linspace(0, len(starts) - 1, count).round().astype(int))]
    return starts


def rollout_windows(
    episodes: list[Episode], context: int, horizon: int, starts_per_episode: int | None = None
) -> dict[str, np.ndarray]:
    """Real data of every open-loop rollout: L + H frames, L + H - 1 actions, validity (B, H)."""
    frames, actions, valid = [], [], []
    for ep in episodes:
        T = ep.num_steps
        starts = rollout_starts(T, context, horizon, starts_per_episode)
        for t0 in starts:
            lo = t0 - context + 1
            n_future = min(horizon, T - t0)  # real frames after t0 within the episode
            f = np.zeros((context + horizon, *ep.obs.shape[1:]), np.uint8)
            f[: context + n_future] = ep.obs[lo : t0 + 1 + n_future]
            a = np.zeros(context + horizon - 1, np.int64)
            n_act = min(context + horizon - 1, T - lo)
            a[:n_act] = ep.act[lo : lo + n_act]
            v = np.arange(1, horizon + 1) <= n_future
            frames.append(f), actions.append(a), valid.append(v)
    if not frames:
        raise ValueError(f"no held-out episode is longer than {context - 1} steps: cannot measure fidelity")
    return {"frames": np.stack(frames), "actions": np.stack(actions), "valid": np.stack(valid)}


@torch.no_grad()
def imagine_open_loop(
    sampler: DiffusionSampler, frames: Tensor, actions: Tensor, context: int, horizon: int,
    generator: torch.Generator | None, valid: Tensor | None = None,
) -> Tensor:
    """frames (B, L + H, 3, h, w) of which only the first L are read; actions (B, L + H - 1).
    Returns the H imagined frames (B, H, 3, h, w).

    With `valid` (B, H) bool (a prefix of True per row, as `rollout_windows` gives), only the rows
    still inside their episode are generated at each step, and the others' frames are zeros: the
    study's 1000-step horizons would otherwise spend most of their time past the episodes' ends."""
    obs, act = frames[:, :context], actions[:, :context]
    imagined = []
    for k in range(horizon):
        if valid is None:
            nxt = sampler.sample(obs, act, generator)
        else:
            rows = valid[:, k].nonzero().squeeze(1)
            nxt = torch.zeros_like(obs[:, -1])
            if len(rows):
                nxt[rows] = sampler.sample(obs[rows], act[rows], generator)
        imagined.append(nxt)
        obs = torch.cat([obs[:, 1:], nxt[:, None]], dim=1)
        if k + 1 < horizon:
            act = torch.cat([act[:, 1:], actions[:, context + k : context + k + 1]], dim=1)
    return torch.stack(imagined, dim=1)


PSNR_MAX_DB = 100.0  # PSNR of identical frames (keeps the JSON finite)


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [0, 1], capped at PSNR_MAX_DB for identical frames."""
    return min(PSNR_MAX_DB, 10 * math.log10(1 / mse)) if mse > 0 else PSNR_MAX_DB


def open_loop_metrics(
    sampler: DiffusionSampler,
    episodes: list[Episode],
    context: int,
    horizons: list[int],
    device: torch.device,
    generator: torch.Generator | None,
    batch_size: int = 64,
) -> dict[str, Any]:
    horizon = max(horizons)
    data = rollout_windows(episodes, context, horizon)
    sq_model, sq_repeat = [], []
    for i in range(0, len(data["frames"]), batch_size):
        frames = to_float(data["frames"][i : i + batch_size], device)
        actions = torch.from_numpy(data["actions"][i : i + batch_size]).to(device)
        imagined = imagine_open_loop(sampler, frames, actions, context, horizon, generator)
        real = frames[:, context:]
        last = frames[:, context - 1 : context]
        # Quantize the imagination as it would be stored, then compare in [0, 1] pixel units.
        imagined = to_float(to_uint8(imagined), device)
        sq_model.append(((imagined - real) / 2).pow(2).mean(dim=(2, 3, 4)).cpu())
        sq_repeat.append(((last - real) / 2).pow(2).mean(dim=(2, 3, 4)).cpu())
    valid = torch.from_numpy(data["valid"])
    count = valid.sum(0)
    mse_model = (torch.cat(sq_model) * valid).sum(0) / count.clamp(min=1)
    mse_repeat = (torch.cat(sq_repeat) * valid).sum(0) / count.clamp(min=1)
    per_step = {
        "count": count.tolist(),
        "mse": mse_model.tolist(),
        "mse_repeat_last": mse_repeat.tolist(),
        "psnr": [psnr(m) for m in mse_model.tolist()],
        "psnr_repeat_last": [psnr(m) for m in mse_repeat.tolist()],
    }
    summary = {}
    for h in horizons:
        w = count[:h].double()
        mm = float((mse_model[:h].double() * w).sum() / w.sum().clamp(min=1))
        mr = float((mse_repeat[:h].double() * w).sum() / w.sum().clamp(min=1))
        summary[str(h)] = {
            "mse": mm, "mse_repeat_last": mr, "psnr": psnr(mm), "psnr_repeat_last": psnr(mr),
            "mse_ratio_to_repeat_last": mm / mr if mr > 0 else None, "rollouts_reaching_h": int(count[h - 1]),
        }
    return {"num_rollouts": int(len(valid)), "horizon": horizon, "per_step": per_step, "horizons": summary}


def classification_report(probs: np.ndarray, target: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """From R's class probabilities (N, classes) and the true classes (N,): accuracy, per-class
    recall of the most likely class, and what sampling from R gives (module docstring). A class
    absent from the targets gets None where it has no steps to average over."""
    pred = probs.argmax(-1)
    recall, support, sampled_recall, sampled_false_rate = {}, {}, {}, {}
    for c, name in enumerate(names):
        here = target == c
        n = int(here.sum())
        support[name] = n
        recall[name] = float((pred[here] == c).mean()) if n else None
        sampled_recall[name] = float(probs[here, c].mean()) if n else None
        sampled_false_rate[name] = float(probs[~here, c].mean()) if n < len(target) else None
    counts = np.bincount(target, minlength=len(names))
    majority = int(counts.argmax()) if len(target) else 0
    present = [r for r in recall.values() if r is not None]
    freq = counts[counts > 0] / max(len(target), 1)
    log_loss = float(-np.log(np.clip(probs[np.arange(len(target)), target], 1e-12, None)).mean()) if len(target) else None
    return {
        "accuracy": float((pred == target).mean()) if len(target) else None,
        "majority_class_accuracy": float((target == majority).mean()) if len(target) else None,
        "balanced_recall": float(np.mean(present)) if present else None,
        "recall": recall,
        "support": support,
        "predicted": {name: int((pred == c).sum()) for c, name in enumerate(names)},
        "sampled_recall": sampled_recall,
        "sampled_false_rate": sampled_false_rate,
        "log_loss": log_loss,
        "log_loss_constant": float(-(freq * np.log(freq)).sum()) if len(target) else None,
    }


@torch.no_grad()
def reward_end_metrics(model: RewardEndModel, episodes: list[Episode], segment_length: int, device: torch.device) -> dict[str, Any]:
    model.eval()
    probs_r, probs_e, targets_r, targets_e = [], [], [], []
    for ep in episodes:
        for lo in range(0, ep.num_steps, segment_length):
            hi = min(lo + segment_length, ep.num_steps)
            frames = to_float(ep.obs[lo : hi + 1], device)[None]
            act = torch.from_numpy(ep.act[lo:hi]).to(device)[None]
            logits_r, logits_e, _ = model(frames[:, :-1], act, frames[:, 1:])
            probs_r.append(logits_r.double().softmax(-1).flatten(0, 1).cpu().numpy())
            probs_e.append(logits_e.double().softmax(-1).flatten(0, 1).cpu().numpy())
            targets_r.append(reward_classes(torch.from_numpy(ep.rew[lo:hi])).numpy())
            targets_e.append(ep.terminated[lo:hi].astype(np.int64))
    assert NUM_REWARD_CLASSES == len(REWARD_CLASS_NAMES) and NUM_END_CLASSES == len(END_CLASS_NAMES)
    return {
        "reward": classification_report(np.concatenate(probs_r), np.concatenate(targets_r), REWARD_CLASS_NAMES),
        "termination": classification_report(np.concatenate(probs_e), np.concatenate(targets_e), END_CLASS_NAMES),
    }


def side_by_side_gif(
    sampler: DiffusionSampler, episode: Episode, context: int, num_frames: int, device: torch.device,
    generator: torch.Generator | None,
) -> bytes:
    """GIF bytes of one open-loop rollout from the episode start: real on the left, imagined right."""
    horizon = max(1, min(num_frames, episode.num_steps - context + 1))
    data = rollout_windows([episode], context, horizon)
    frames = to_float(data["frames"][:1], device)
    actions = torch.from_numpy(data["actions"][:1]).to(device)
    imagined = to_uint8(imagine_open_loop(sampler, frames, actions, context, horizon, generator))[0]
    real = data["frames"][0, context:]
    pairs = np.concatenate([real, np.full_like(real[:, :, :, :2], 255), imagined], axis=3)  # (H, 3, h, 2w+2)
    return gif_bytes(pairs, frame_ms=GIF_FRAME_MS)


def measure_fidelity(
    sampler: DiffusionSampler,
    reward_end: RewardEndModel,
    episodes: list[Episode],
    context: int,
    horizons: list[int],
    reward_segment_length: int,
    gif_frames: int,
    gif_path: Path | None,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """All fidelity numbers as one JSON-ready dict; writes the GIF to `gif_path` when given."""
    if not horizons or min(horizons) < 1:
        raise ValueError(f"fidelity horizons {horizons} must be a non-empty list of integers >= 1")
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = sampler.denoiser.training, reward_end.training
    sampler.denoiser.eval()
    out: dict[str, Any] = {
        "num_episodes": len(episodes),
        "num_steps": int(sum(ep.num_steps for ep in episodes)),
        "open_loop": open_loop_metrics(sampler, episodes, context, horizons, device, generator),
        "reward_end": reward_end_metrics(reward_end, episodes, reward_segment_length, device),
    }
    if gif_path is not None and gif_frames > 0:
        longest = max(episodes, key=lambda ep: ep.num_steps)
        atomic_write_bytes(gif_path, side_by_side_gif(sampler, longest, context, gif_frames, device, generator))
        out["gif"] = str(gif_path)
    sampler.denoiser.train(was_training[0])
    reward_end.train(was_training[1])
    return out


def summary_metrics(fidelity: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for MLflow: per-horizon PSNR/MSE (model and baseline), R's accuracy, recalls
    (most likely class and sampled) and log losses."""
    flat: dict[str, float] = {}
    for h, m in fidelity["open_loop"]["horizons"].items():
        for k in ("mse", "mse_repeat_last", "psnr", "psnr_repeat_last", "mse_ratio_to_repeat_last"):
            if m[k] is not None:
                flat[f"fidelity/h{h}/{k}"] = m[k]
    for head in ("reward", "termination"):
        rep = fidelity["reward_end"][head]
        for k in ("accuracy", "majority_class_accuracy", "balanced_recall", "log_loss", "log_loss_constant"):
            if rep[k] is not None:
                flat[f"fidelity/{head}/{k}"] = rep[k]
        for per_class in ("recall", "sampled_recall"):
            for name, r in rep[per_class].items():
                if r is not None:
                    flat[f"fidelity/{head}/{per_class}_{name}"] = r
    return flat
