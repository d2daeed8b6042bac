"""Aggregate metrics against rliable and hand-computed values (diamond/results/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics as rlm

from diamond.results.metrics import (
    METRICS,
    aggregate,
    improvement_over,
    performance_profiles,
    probability_of_improvement,
    score_matrix,
)
from diamond.results.scores import MethodScores, human_scores, random_scores

GAMES = ("Boxing", "Breakout", "Freeway", "Pong")


def from_hns(name: str, hns: np.ndarray, games=GAMES) -> MethodScores:
    """A method whose raw scores have the given HNS matrix (runs x games)."""
    h, r = human_scores(), random_scores()
    return MethodScores(name, {g: hns[:, j] * (h[g] - r[g]) + r[g] for j, g in enumerate(games)})


# 3 runs x 4 games, made up so that the hand-computed values below are easy to check.
HNS = np.array([
    [0.0, 1.0, 2.0, 4.0],
    [0.5, 1.5, 2.0, 0.0],
    [1.0, 0.5, 2.0, 2.0],
])


def test_score_matrix_recovers_hns_in_benchmark_order():
    m = score_matrix(from_hns("x", HNS))
    assert m.games == GAMES and m.runs == 3 and m.balanced and m.partial
    np.testing.assert_allclose(m.hns, HNS, atol=1e-12)


def test_point_estimates_match_hand_computed_and_rliable():
    agg = aggregate([score_matrix(from_hns("x", HNS))], reps=50, confidence=0.95, seed=0)["x"]
    per_game = HNS.mean(axis=0)  # 0.5, 1.0, 2.0, 2.0
    e = {k: agg.estimates[k].value for k in METRICS}
    assert e["mean"] == pytest.approx(1.375)
    assert e["median"] == pytest.approx(1.5)
    # IQM: the middle 50% of the 12 sorted scores (drop 3 lowest, 3 highest) -> mean of six.
    assert e["iqm"] == pytest.approx(np.mean(np.sort(HNS.ravel())[3:9]))
    assert e["optimality_gap"] == pytest.approx(1 - np.mean(np.minimum(HNS, 1)))
    assert e["iqm"] == pytest.approx(rlm.aggregate_iqm(HNS))
    assert e["median"] == pytest.approx(np.median(per_game))
    assert agg.superhuman == 2  # Freeway and Pong average 2.0; Breakout's 1.0 is not above human
    assert (agg.runs_per_game, len(agg.games)) == (3, 4)


def test_intervals_are_rliables_stratified_bootstrap_with_the_seed():
    seed, reps = 7, 200
    agg = aggregate([score_matrix(from_hns("x", HNS))], reps=reps, confidence=0.9, seed=seed)["x"]

    def fn(s: np.ndarray) -> np.ndarray:
        return np.array([rlm.aggregate_median(s), rlm.aggregate_iqm(s), rlm.aggregate_mean(s),
                         rlm.aggregate_optimality_gap(s)])

    np.random.seed(seed)  # rliable resamples with numpy's global RNG
    _, ci = rly.get_interval_estimates({"x": HNS}, fn, reps=reps, confidence_interval_size=0.9)
    for i, k in enumerate(METRICS):
        assert (agg.estimates[k].lo, agg.estimates[k].hi) == pytest.approx((ci["x"][0, i], ci["x"][1, i]), abs=1e-9)
        assert agg.estimates[k].lo <= agg.estimates[k].value <= agg.estimates[k].hi


def test_bootstrap_is_reproducible_and_leaves_the_global_rng_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    runs = [aggregate([score_matrix(from_hns("x", HNS))], reps=100, confidence=0.95, seed=3)["x"] for _ in range(2)]
    assert runs[0] == runs[1]
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    other = aggregate([score_matrix(from_hns("x", HNS))], reps=100, confidence=0.95, seed=4)["x"]
    assert other.estimates["mean"] != runs[0].estimates["mean"]  # the seed is used


def test_uneven_runs_use_the_fewest_and_say_so():
    m = from_hns("x", HNS)
    m.scores["Pong"] = np.append(m.scores["Pong"], [30.0, 30.0])  # 5 runs on Pong, 3 elsewhere
    mat = score_matrix(m)
    assert mat.runs == 3 and mat.runs_available == (3, 5) and not mat.balanced
    np.testing.assert_allclose(mat.hns, HNS, atol=1e-12)


@pytest.mark.parametrize("shape_x, shape_y", [((3, 5), (4, 5)), ((1, 6), (10, 6)), ((5, 2), (5, 2))])
def test_probability_of_improvement_equals_rliables(shape_x, shape_y):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=shape_x).astype(float)  # small integers: many ties
    y = rng.integers(0, 4, size=shape_y).astype(float)
    assert probability_of_improvement(x, y)[0] == pytest.approx(rlm.probability_of_improvement(x, y))
    assert probability_of_improvement(x, x)[0] == pytest.approx(0.5)


def test_improvement_is_over_common_games_only():
    ours = from_hns("ours", HNS[:, :2], games=GAMES[:2])
    base = from_hns("base", np.zeros((2, 4)))
    (imp,) = improvement_over(ours, [base], reps=50, confidence=0.95, seed=0)
    assert imp.games == GAMES[:2]
    # ours beats 0 except its zero run on Boxing (a tie, half): (2.5/3 + 3/3) / 2.
    assert imp.estimate.value == pytest.approx((2.5 / 3 + 1.0) / 2)


def test_performance_profiles_match_rliable():
    taus = np.linspace(0.25, 3.25, 7)  # between the scores: no float ties at a threshold
    mat = score_matrix(from_hns("x", HNS))
    prof, ci = performance_profiles([mat], taus, reps=50, confidence=0.95, seed=0)
    np.testing.assert_allclose(prof["x"], [np.mean(HNS > t) for t in taus])
    assert ci["x"].shape == (2, len(taus))
