"""The world-model study's error arrays (diamond/world_model/study.py writes one file per job):
their file format, the metric names, and the statistics the report draws from them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("mse", "psnr", "ssim")


def horizon_summary(errors: dict[str, np.ndarray], horizons: list[int]) -> dict[str, dict[str, Any]]:
    """Mean of each metric at each horizon over the rollouts reaching it (None where none does)."""
    valid = errors["valid"]
    out: dict[str, dict[str, Any]] = {}
    for h in horizons:
        row: dict[str, Any] = {"rollouts": int(valid[:, h - 1].sum()) if h <= valid.shape[1] else 0}
        for who in ("model", "repeat_last"):
            for k in METRICS:
                row[f"{who}_{k}"] = float(errors[f"{who}_{k}"][valid[:, h - 1], h - 1].mean()) if row["rollouts"] else None
        out[str(h)] = row
    return out


def bootstrap_mean_ci(
    per_seed: list[np.ndarray], reps: int, confidence: float, rng: np.random.Generator
) -> tuple[float, float, float] | None:
    """Mean over seeds of each seed's mean over rollouts, with a two-stage percentile bootstrap CI:
    seeds resampled with replacement, then rollouts within each drawn seed (Davison & Hinkley 1997,
    section 3.8), so both training seeds and held-out rollouts count as sources of variation; with
    one seed it is the ordinary bootstrap over rollouts. None when no seed has a value."""
    groups = [np.asarray(g, dtype=np.float64) for g in per_seed if len(g)]
    if not groups:
        return None
    mean = float(np.mean([g.mean() for g in groups]))
    stats = np.empty(reps)
    for r in range(reps):
        drawn = rng.integers(0, len(groups), len(groups))
        stats[r] = np.mean([groups[j][rng.integers(0, len(groups[j]), len(groups[j]))].mean() for j in drawn])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return mean, float(lo), float(hi)


def values_at(errors: dict[str, np.ndarray], key: str, h: int) -> np.ndarray:
    """One job's per-rollout values of `key` at horizon h (only rollouts reaching it)."""
    valid = errors["valid"]
    if h > valid.shape[1]:
        return np.zeros(0)
    return errors[key][valid[:, h - 1], h - 1]


def per_step_means(errors: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    """Mean over jobs (seeds) of each job's per-step mean over the rollouts reaching the step, for
    steps 1..H of the longest job; NaN where a job has no rollout."""
    horizon = max(e["valid"].shape[1] for e in errors)
    rows = np.full((len(errors), horizon), math.nan)
    for j, e in enumerate(errors):
        count = e["valid"].sum(0)
        total = np.where(e["valid"], e[key], 0.0).sum(0)
        rows[j, : len(count)] = np.where(count > 0, total / np.maximum(count, 1), math.nan)
    return rows.mean(axis=0)


def errors_npz(errors: dict[str, np.ndarray]) -> bytes:
    """The arrays as compressed .npz bytes (for an atomic write)."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **errors)
    return buf.getvalue()


def load_errors(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
