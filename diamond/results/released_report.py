"""The authors' released agents under this pipeline's protocol, beside the paper's own runs.

Per game: the released agent's mean return over its test episodes (with a bootstrap interval
over episodes) against the paper's five per-seed scores for DIAMOND (reference_data): is it
inside the published seeds' range? Then the aggregates (human-normalized, stratified bootstrap,
from `diamond.results.report`) of both, over the games the released agents were evaluated on.

The files are written even with no released run (a one-line note), because pipelines declare a
fixed set of outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import bootstrap  # noqa: E402

from diamond.io import atomic_write_bytes  # noqa: E402
from diamond.results.metrics import METRIC_LABELS, METRICS, MethodAggregates  # noqa: E402
from diamond.results.report import Report, save_figure  # noqa: E402
from diamond.results.scores import MethodScores, RunResult, atari_100k_games, human_normalized  # noqa: E402

STEM = "released_vs_paper"
PAPER_METHOD = "DIAMOND"


@dataclass(frozen=True)
class GameComparison:
    game: str
    episodes: int
    mean: float
    ci: tuple[float, float]  # bootstrap over the test episodes
    paper_seeds: tuple[float, ...]

    @property
    def verdict(self) -> str:
        """Where the released agent's mean falls against the published seeds' range."""
        if not self.paper_seeds:
            return "no published scores"
        lo, hi = min(self.paper_seeds), max(self.paper_seeds)
        return "inside" if lo <= self.mean <= hi else ("above" if self.mean > hi else "below")


def compare_games(results: Sequence[RunResult], paper: MethodScores, confidence: float, seed: int) -> list[GameComparison]:
    """One row per game of the released runs (several evaluation seeds of a game are pooled)."""
    by_game: dict[str, list[float]] = {}
    for r in results:
        by_game.setdefault(r.game, []).extend(r.episode_returns)
    rows = []
    for game in [g for g in atari_100k_games() if g in by_game]:
        x = np.asarray(by_game[game], dtype=float)
        rows.append(GameComparison(game, len(x), float(x.mean()), _mean_ci(x, confidence, seed),
                                   tuple(float(s) for s in paper.scores.get(game, ()))))
    return rows


def _mean_ci(x: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    if len(x) < 2 or np.all(x == x[0]):  # no spread: the interval is the point
        return float(x.mean()), float(x.mean())
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=10_000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _over_released_games(report: Report, released: str) -> dict[str, MethodAggregates]:
    """Aggregates of every method over the released agents' games (the like-for-like block)."""
    for sub in report.subsets:
        if sub.owner == released:
            return sub.aggregates
    return report.aggregates


def comparison_markdown(rows: list[GameComparison], report: Report, released: str, confidence: float) -> str:
    pct = f"{confidence:.0%}"
    lines = [f"# {released} vs the paper's runs ({PAPER_METHOD}, published per-seed scores)", ""]
    if not rows:
        return "\n".join(lines + ["No released agent was evaluated: `released.games` is empty.", ""])
    lines += [f"| Game | Released: mean return [{pct} CI over episodes] | Episodes | Paper seeds | Paper range | Released vs range |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        seeds = ", ".join(f"{s:.1f}" for s in r.paper_seeds) or "–"
        rng = f"{min(r.paper_seeds):.1f} – {max(r.paper_seeds):.1f}" if r.paper_seeds else "–"
        lines.append(f"| {r.game} | {r.mean:.1f} [{r.ci[0]:.1f}, {r.ci[1]:.1f}] | {r.episodes} | {seeds} | {rng} | {r.verdict} |")
    inside = sum(r.verdict == "inside" for r in rows)
    lines += ["", f"Inside the published seeds' range on {inside} of {len(rows)} games.", ""]
    aggs = _over_released_games(report, released)
    names = [n for n in (released, PAPER_METHOD) if n in aggs]
    games = len(rows)
    lines += [f"Aggregates over these {games} game(s), human-normalized, {pct} stratified-bootstrap CIs:", "",
              "| Metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in METRICS:
        cells = [f"{aggs[n].estimates[key].value:.3f} [{aggs[n].estimates[key].lo:.3f}, {aggs[n].estimates[key].hi:.3f}]" for n in names]
        lines.append(f"| {METRIC_LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[GameComparison], released: str, path: Path) -> None:
    """Per game, in human-normalized score: the paper's seeds (dots) and the released agent (diamond, CI bar)."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(rows), 3) + 1))
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "No released agent evaluated (released.games is empty)", ha="center", va="center")
    for y, r in enumerate(reversed(rows)):
        paper = [human_normalized(r.game, s) for s in r.paper_seeds]
        ax.scatter(paper, [y] * len(paper), color="0.55", s=18, label=f"{PAPER_METHOD} (paper, per seed)" if y == 0 else None)
        lo, hi = (human_normalized(r.game, v) for v in r.ci)
        mean = human_normalized(r.game, r.mean)
        ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], fmt="D", color="tab:red", markersize=6,
                    label=released if y == 0 else None)
    if rows:
        ax.set_yticks(range(len(rows)), [r.game for r in reversed(rows)])
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("Human normalized score (symlog scale)")
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(True, axis="x", alpha=0.3)
    save_figure(fig, path)


def write_comparison(results: Sequence[RunResult], paper: MethodScores, report: Report, released: str,
                     out_dir: Path, confidence: float, seed: int) -> list[Path]:
    """reports/released_vs_paper.{md,png}; `results` are the released agents' score files."""
    rows = compare_games([r for r in results if r.method == released], paper, confidence, seed)
    md, png = Path(out_dir) / f"{STEM}.md", Path(out_dir) / f"{STEM}.png"
    atomic_write_bytes(md, comparison_markdown(rows, report, released, confidence).encode())
    plot_comparison(rows, released, png)
    return [md, png]
