"""Aggregate metrics over games (Agarwal et al. 2021), computed with the `rliable` package.

A method's scores become a matrix of human-normalized scores (runs x games); rliable's
stratified bootstrap (runs resampled within each game) gives the confidence intervals of the
mean, median, interquartile mean (IQM) and optimality gap, of the probability of improvement
and of the performance profiles.

Reproducibility: rliable draws its bootstrap indices from numpy's *global* RNG (not from the
`random_state` it accepts), so every bootstrap here runs inside `seeded_global_rng`, which seeds
that RNG and restores it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from rliable import library as rly
from rliable import metrics as rlm

from diamond.results.scores import MethodScores, atari_100k_games, human_normalized

METRICS: tuple[str, ...] = ("median", "iqm", "mean", "optimality_gap")
METRIC_LABELS = {"median": "Median", "iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality Gap"}


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    lo: float
    hi: float

    def to_json(self) -> dict:
        return {"value": self.value, "ci": [self.lo, self.hi]}


@dataclass(frozen=True)
class ScoreMatrix:
    """Human-normalized scores of one method, runs x games, as rliable expects them.

    rliable needs the same number of runs on every game. When a method has more seeds on some
    games than others, the matrix keeps the first `runs` seeds of each game, and
    `runs_available` records the range so that the tables can say so.
    """

    name: str
    games: tuple[str, ...]
    hns: np.ndarray  # (runs, games)
    runs_available: tuple[int, int]  # (fewest, most) runs over its games

    @property
    def runs(self) -> int:
        return int(self.hns.shape[0])

    @property
    def balanced(self) -> bool:
        return self.runs_available[0] == self.runs_available[1]

    @property
    def partial(self) -> bool:
        return len(self.games) < len(atari_100k_games())


@dataclass(frozen=True)
class MethodAggregates:
    name: str
    games: tuple[str, ...]
    runs_per_game: int
    runs_available: tuple[int, int]
    estimates: dict[str, Estimate]  # keyed by METRICS
    superhuman: int  # games whose mean HNS over runs is above 1 (human)

    @property
    def partial(self) -> bool:
        return len(self.games) < len(atari_100k_games())

    def to_json(self) -> dict:
        out = {m: self.estimates[m].to_json() for m in METRICS}
        out.update(
            superhuman=self.superhuman,
            games=len(self.games),
            runs_per_game=self.runs_per_game,
            runs_available=list(self.runs_available),
            game_list=list(self.games),
        )
        return out


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def score_matrix(method: MethodScores, games: Sequence[str] | None = None) -> ScoreMatrix:
    """HNS matrix of `method` over `games` (default: all its own games, benchmark order)."""
    games = tuple(method.games if games is None else games)
    missing = [g for g in games if g not in method.scores]
    if missing or not games:
        raise ValueError(f"{method.name} has no scores for {missing or 'any game'}")
    counts = [len(method.scores[g]) for g in games]
    runs = min(counts)
    columns = [human_normalized(g, method.scores[g][:runs]) for g in games]
    return ScoreMatrix(method.name, games, np.stack(columns, axis=1), (runs, max(counts)))


def _aggregate_vector(hns: np.ndarray) -> np.ndarray:
    # Order matches METRICS; one bootstrap serves all four metrics.
    return np.array([
        rlm.aggregate_median(hns),
        rlm.aggregate_iqm(hns),
        rlm.aggregate_mean(hns),
        rlm.aggregate_optimality_gap(hns),
    ])


def aggregate(matrices: Sequence[ScoreMatrix], reps: int, confidence: float, seed: int) -> dict[str, MethodAggregates]:
    """Mean, median, IQM and optimality gap with stratified bootstrap CIs, per method, each over
    its own games; plus the count of games above human."""
    out = {}
    for m in matrices:
        with seeded_global_rng(seed):
            points, intervals = rly.get_interval_estimates(
                {m.name: m.hns}, _aggregate_vector, reps=reps, confidence_interval_size=confidence
            )
        p, ci = points[m.name], intervals[m.name]
        estimates = {k: Estimate(float(p[i]), float(ci[0, i]), float(ci[1, i])) for i, k in enumerate(METRICS)}
        superhuman = int(np.sum(m.hns.mean(axis=0) > 1.0))
        out[m.name] = MethodAggregates(m.name, m.games, m.runs, m.runs_available, estimates, superhuman)
    return out


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> np.ndarray:
    """P(X > Y) averaged over games (ties count one half), as `rliable.metrics.probability_of_improvement`.

    Same quantity as rliable's (its Mann-Whitney U over runs_x * runs_y, per game), computed with
    one broadcast comparison instead of one scipy call per game: rliable's version costs about
    10 ms per bootstrap replicate, which makes 2,000 replicates x 7 baselines take minutes.
    tests/test_metrics.py checks the two agree.
    """
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    per_game = np.mean(x > y, axis=(0, 1)) + 0.5 * np.mean(x == y, axis=(0, 1))
    return np.array([np.mean(per_game)])


@dataclass(frozen=True)
class Improvement:
    subject: str
    baseline: str
    games: tuple[str, ...]
    estimate: Estimate

    def to_json(self) -> dict:
        return {**self.estimate.to_json(), "games": len(self.games)}


def improvement_over(
    subject: MethodScores, baselines: Sequence[MethodScores], reps: int, confidence: float, seed: int
) -> list[Improvement]:
    """Probability of improvement of `subject` over each baseline, on the games both have."""
    out = []
    for base in baselines:
        common = [g for g in subject.games if g in base.scores]
        if not common:
            continue
        x, y = score_matrix(subject, common).hns, score_matrix(base, common).hns
        key = f"{subject.name},{base.name}"
        with seeded_global_rng(seed):
            points, intervals = rly.get_interval_estimates(
                {key: [x, y]}, probability_of_improvement, reps=reps, confidence_interval_size=confidence
            )
        est = Estimate(float(points[key][0]), float(intervals[key][0, 0]), float(intervals[key][1, 0]))
        out.append(Improvement(subject.name, base.name, tuple(common), est))
    return out


def performance_profiles(
    matrices: Sequence[ScoreMatrix], taus: np.ndarray, reps: int, confidence: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score distributions (fraction of runs with HNS > tau), each over the method's own games."""
    with seeded_global_rng(seed):
        return rly.create_performance_profile(
            {m.name: m.hns for m in matrices}, taus, reps=reps, confidence_interval_size=confidence
        )
