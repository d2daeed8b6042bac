"""Tables and figures of the world-model study (diamond/world_model/study.py) from its per-job error arrays.

- a table per metric (MSE, PSNR, SSIM) of the error at each horizon per variant, the mean over
  seeds and rollouts with a bootstrap CI (`diamond.results.study_errors.bootstrap_mean_ci`), plus the
  repeat-last-frame baseline's row (Markdown; CSV in long form);
- error vs horizon (every step, log x) per variant, the baseline dashed;
- a strip of frames per variant at the fixed horizons beside the real frames (first seed);
- a JSON with every number.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from diamond.config import StudyConfig
from diamond.results.study_errors import METRICS, bootstrap_mean_ci, per_step_means, values_at

BASELINE = "repeat-last"
METRIC_LABELS = {"mse": "MSE (lower is better)", "psnr": "PSNR dB (higher is better)", "ssim": "SSIM (higher is better)"}
STRIP_SCALE = 2  # nearest-neighbour upscaling of the frames in the strip


def summarize(study: StudyConfig, errors: dict[tuple[str, int], dict[str, np.ndarray]]) -> dict[str, Any]:
    """Every number of the study: per variant (and the baseline), metric and horizon, the mean
    over seeds and rollouts with its CI, and the per-step mean curves. `errors` maps (variant
    name, seed) to that job's arrays."""
    rng = np.random.default_rng(study.bootstrap_seed)
    rows: dict[str, Any] = {}
    groups = [(v.name, "model_", [errors[(v.name, s)] for s in study.seeds], v) for v in study.variants]
    # The baseline depends on the held-out data alone, the same in every job: one job's arrays.
    first = errors[(study.variants[0].name, study.seeds[0])]
    groups.append((BASELINE, "repeat_last_", [first], None))
    for name, prefix, jobs, variant in groups:
        row: dict[str, Any] = {
            "formulation": variant.formulation if variant else None,
            "num_steps": variant.num_steps if variant else None,
            "seeds": study.seeds if variant else None,
            "horizons": {},
            "per_step": {k: _finite(per_step_means(jobs, prefix + k)) for k in METRICS},
        }
        for h in study.horizons:
            cell: dict[str, Any] = {"rollouts": int(sum(len(values_at(j, prefix + "mse", h)) for j in jobs))}
            for k in METRICS:
                ci = bootstrap_mean_ci([values_at(j, prefix + k, h) for j in jobs], study.bootstrap_reps, study.confidence, rng)
                cell[k] = None if ci is None else {"mean": ci[0], "ci_low": ci[1], "ci_high": ci[2]}
            row["horizons"][str(h)] = cell
        rows[name] = row
    return {
        "game": study.games[0] if study.games else None,
        "dataset": study.dataset,
        "denoiser_steps": study.denoiser_steps,
        "heldout_episodes": study.heldout_episodes,
        "rollouts_per_episode": study.rollouts_per_episode,
        "horizons": study.horizons,
        "confidence": study.confidence,
        "bootstrap_reps": study.bootstrap_reps,
        "rows": rows,
    }


def _finite(a: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in a]


def _cell(c: dict[str, Any] | None, digits: int) -> str:
    if c is None:
        return "n/a"
    return f"{c['mean']:.{digits}f} [{c['ci_low']:.{digits}f}, {c['ci_high']:.{digits}f}]"


DIGITS = {"mse": 5, "psnr": 2, "ssim": 3}


def table_markdown(results: dict[str, Any]) -> str:
    """One table per metric: rows variants and the baseline, columns horizons."""
    pct = round(100 * results["confidence"])
    hs = results["horizons"]
    lines = [
        f"# World-model study: {results['game']}, open-loop error vs horizon",
        "",
        f"Dataset `{results['dataset']}`; D trained {results['denoiser_steps']} steps per variant and seed; "
        f"{results['heldout_episodes']} held-out episodes, {results['rollouts_per_episode']} rollouts per episode, "
        f"real actions. Mean over seeds and rollouts reaching the horizon, [{pct}% bootstrap CI] "
        f"({results['bootstrap_reps']} resamples of seeds, then rollouts); n/a: no rollout reaches it.",
    ]
    for k in METRICS:
        lines += ["", f"## {METRIC_LABELS[k]}", "",
                  "| variant | " + " | ".join(f"h={h}" for h in hs) + " |",
                  "| --- | " + " | ".join("---" for _ in hs) + " |"]
        for name, row in results["rows"].items():
            cells = [_cell(row["horizons"][str(h)][k], DIGITS[k]) for h in hs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(results["rows"].values()))
    lines += ["", "Rollouts reaching each horizon (all seeds): "
              + ", ".join(f"h={h}: {first['horizons'][str(h)]['rollouts']}" for h in hs) + "."]
    return "\n".join(lines) + "\n"


def table_csv(results: dict[str, Any]) -> str:
    """Long form: one line per variant, metric and horizon."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "formulation", "num_steps", "metric", "horizon", "mean", "ci_low", "ci_high", "rollouts"])
    for name, row in results["rows"].items():
        for h in results["horizons"]:
            cell = row["horizons"][str(h)]
            for k in METRICS:
                c = cell[k] or {"mean": "", "ci_low": "", "ci_high": ""}
                w.writerow([name, row["formulation"] or "", row["num_steps"] or "", k, h, c["mean"], c["ci_low"],
                            c["ci_high"], cell["rollouts"]])
    return buf.getvalue()


def plot_error_vs_horizon(results: dict[str, Any], path: Path) -> None:
    """Per-step mean of each metric vs horizon (log x), one line per variant, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), constrained_layout=True)
    for ax, k in zip(axes, METRICS):
        for name, row in results["rows"].items():
            y = np.array([math.nan if v is None else v for v in row["per_step"][k]])
            x = np.arange(1, len(y) + 1)
            ax.plot(x, y, ls="--" if name == BASELINE else "-", color="k" if name == BASELINE else None, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("horizon (steps after the last real frame)")
        ax.set_title(METRIC_LABELS[k])
        for h in results["horizons"]:
            ax.axvline(h, color="0.85", lw=0.8, zorder=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['game']}: open-loop error of each world-model variant")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frame_strip(strips: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> None:
    """Rows: the real frames, then each variant's imagined frames; columns: the last real frame
    given, then the fixed horizons the shown rollout reaches. `strips` maps a variant name to
    one job's strip_* arrays (the same rollout in every job)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(strips.values()))
    hs = [int(h) for h in first["strip_horizons"]]
    rows = [("real", first["strip_real"])] + [(name, s["strip_imagined"]) for name, s in strips.items()]
    cols = len(hs) + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1, 1.3 * len(rows) + 0.5), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        images = [first["strip_context"]] + [frames[i] for i in range(len(hs))]
        for c, img in enumerate(images):
            ax = axes[r][c]
            ax.imshow(img.transpose(1, 2, 0).repeat(STRIP_SCALE, 0).repeat(STRIP_SCALE, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("given (t0)" if c == 0 else f"h={hs[c - 1]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
