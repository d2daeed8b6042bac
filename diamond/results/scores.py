"""Atari 100k scores: the published reference numbers, this pipeline's result files, and the
human-normalized score (HNS) that puts every game on one scale.

Every score here is a raw game score per run (one run = one game and one seed, scored by the
mean return of its final test episodes); normalization happens in one place, `human_normalized`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from diamond.env.games import REFERENCE_METHODS
from diamond.io import ArtifactError, read_json

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_data"
# Methods shipped in reference_data/, in the order the tables show them (README.md there).
RESULT_KEYS = ("game", "seed", "episode_returns", "mean_return", "human_normalized_score", "num_episodes", "method")


@dataclass(frozen=True)
class MethodScores:
    """Raw final scores of one method: game -> one score per run, in seed order."""

    name: str
    scores: dict[str, np.ndarray]

    @property
    def games(self) -> list[str]:
        """The games this method has scores for, in the benchmark's order."""
        return [g for g in atari_100k_games() if g in self.scores]

    def per_game_mean(self) -> dict[str, float]:
        return {g: float(np.mean(self.scores[g])) for g in self.games}

    def runs_per_game(self) -> dict[str, int]:
        return {g: len(self.scores[g]) for g in self.games}


@dataclass(frozen=True)
class RunResult:
    """One `evaluate` score file (the per-run contract between evaluate and aggregate)."""

    path: Path
    game: str
    seed: int
    episode_returns: list[float]
    mean_return: float
    human_normalized_score: float
    num_episodes: int
    method: str


# ---------------------------------------------------------------- reference data


@cache
def human_scores() -> dict[str, float]:
    return _single_scores("HUMAN")


@cache
def random_scores() -> dict[str, float]:
    return _single_scores("RANDOM")


def atari_100k_games() -> tuple[str, ...]:
    """The 26 games of the benchmark: the keys of HUMAN.json, in file (alphabetical) order."""
    return tuple(human_scores())


def human_normalized(game: str, score: float | np.ndarray) -> float | np.ndarray:
    """(score - random) / (human - random) for `game`: 0 is the random policy, 1 the human."""
    if game not in human_scores():
        raise ArtifactError(f"game {game!r} has no human/random reference score; known: {', '.join(atari_100k_games())}")
    lo, hi = random_scores()[game], human_scores()[game]
    return (score - lo) / (hi - lo)


def load_method(name: str) -> MethodScores:
    """Published per-run scores of a reference method (one of REFERENCE_METHODS)."""
    if name not in REFERENCE_METHODS:
        raise ArtifactError(f"unknown reference method {name!r}; allowed: {', '.join(REFERENCE_METHODS)}")
    path = REFERENCE_DIR / f"{name}.json"
    data = read_json(path)
    scores = _curl_records_to_scores(data, path) if name == "CURL" else _score_table(data, path)
    return MethodScores(name, scores)


def _single_scores(name: str) -> dict[str, float]:
    path = REFERENCE_DIR / f"{name}.json"
    table = _score_table(read_json(path), path)
    for game, runs in table.items():
        if len(runs) != 1:
            raise ArtifactError(f"{path}: {game} must hold exactly one score, got {len(runs)}")
    return {g: float(v[0]) for g, v in table.items()}


def _score_table(data: Any, path: Path) -> dict[str, np.ndarray]:
    """Check the common reference layout {"Game": [score per run]}."""
    if not isinstance(data, dict) or not data:
        raise ArtifactError(f"{path}: expected a JSON object mapping game -> list of scores")
    out = {}
    for game, runs in data.items():
        if not isinstance(runs, list) or not runs or not all(_is_finite_number(v) for v in runs):
            raise ArtifactError(f"{path}: {game} must map to a non-empty list of finite numbers, got {runs!r:.80}")
        out[game] = np.asarray(runs, dtype=np.float64)
    if path.stem not in ("HUMAN",):
        _check_games(out, path)
    return out


def _curl_records_to_scores(data: Any, path: Path) -> dict[str, np.ndarray]:
    """CURL is published as records {game, seed, HNS, Max HNS}; keep the final-policy HNS of each
    run, ordered by seed, and map it back to a raw score so CURL follows the common path."""
    if not isinstance(data, list) or not data:
        raise ArtifactError(f"{path}: expected a list of {{game, seed, HNS}} records")
    by_game: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not {"game", "seed", "HNS"} <= set(rec):
            raise ArtifactError(f"{path}: record {i} must hold game, seed and HNS, got {rec!r:.80}")
        if not _is_finite_number(rec["HNS"]) or not _is_finite_number(rec["seed"]):
            raise ArtifactError(f"{path}: record {i} has a non-numeric seed or HNS: {rec!r:.80}")
        by_game.setdefault(rec["game"], []).append((float(rec["seed"]), float(rec["HNS"])))
    _check_games(by_game, path)
    h, r = human_scores(), random_scores()
    out = {}
    for game, runs in by_game.items():
        hns = np.array([v for _, v in sorted(runs)])
        out[game] = hns * (h[game] - r[game]) + r[game]
    return out


def _check_games(table: dict[str, Any], path: Path) -> None:
    unknown = sorted(set(table) - set(atari_100k_games()))
    if unknown:
        raise ArtifactError(f"{path}: unknown game {unknown[0]!r}; allowed: {', '.join(atari_100k_games())}")


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------- this pipeline's results


def load_result(path: str | Path) -> RunResult:
    """Read and check one score.json written by `evaluate`; any problem names the file."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object with keys {', '.join(RESULT_KEYS)}")
    missing = [k for k in RESULT_KEYS if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing key {missing[0]!r}; a score file holds {', '.join(RESULT_KEYS)}")
    game, seed, method = data["game"], data["seed"], data["method"]
    if game not in atari_100k_games():
        raise ArtifactError(f"{path}: game {game!r} is not an Atari 100k game; allowed: {', '.join(atari_100k_games())}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArtifactError(f"{path}: seed must be an integer, got {seed!r}")
    if not isinstance(method, str) or not method.strip():
        raise ArtifactError(f"{path}: method must be a non-empty string, got {method!r}")
    returns = data["episode_returns"]
    if not isinstance(returns, list) or not returns or not all(_is_finite_number(v) for v in returns):
        raise ArtifactError(f"{path}: episode_returns must be a non-empty list of finite numbers")
    for key in ("mean_return", "human_normalized_score"):
        if not _is_finite_number(data[key]):
            raise ArtifactError(f"{path}: {key} must be a finite number, got {data[key]!r}")
    num = data["num_episodes"]
    if isinstance(num, bool) or not isinstance(num, int) or num != len(returns):
        raise ArtifactError(f"{path}: num_episodes is {num!r} but episode_returns holds {len(returns)} returns")
    # The stored summaries must agree with the returns they summarize: a mismatch means a
    # hand-edited or mixed-up file, and the table would otherwise show the wrong number.
    mean = float(np.mean(returns))
    if not math.isclose(data["mean_return"], mean, rel_tol=1e-6, abs_tol=1e-6):
        raise ArtifactError(f"{path}: mean_return {data['mean_return']!r} is not the mean of episode_returns ({mean!r})")
    hns = float(human_normalized(game, mean))
    if not math.isclose(data["human_normalized_score"], hns, rel_tol=1e-6, abs_tol=1e-6):
        raise ArtifactError(
            f"{path}: human_normalized_score {data['human_normalized_score']!r} does not match "
            f"(mean_return - random) / (human - random) = {hns!r}"
        )
    return RunResult(path, game, seed, [float(v) for v in returns], mean, hns, num, method)


def load_results(paths: Iterable[str | Path]) -> list[RunResult]:
    results = [load_result(p) for p in paths]
    seen: dict[tuple[str, str, int], Path] = {}
    for r in results:
        key = (r.method, r.game, r.seed)
        if key in seen:
            raise ArtifactError(f"{r.path}: duplicate result for {r.method} {r.game} seed {r.seed} (also in {seen[key]})")
        seen[key] = r.path
    return results


def results_by_method(results: Sequence[RunResult]) -> list[MethodScores]:
    """Group run results into one MethodScores per `method`, runs in seed order."""
    grouped: dict[str, dict[str, list[RunResult]]] = {}
    for r in results:
        grouped.setdefault(r.method, {}).setdefault(r.game, []).append(r)
    out = []
    for method, games in grouped.items():
        if method in REFERENCE_METHODS:
            path = next(iter(games.values()))[0].path
            raise ArtifactError(
                f"{path}: method {method!r} clashes with the published reference column of that name; "
                "write this pipeline's runs under another name (params aggregate.method_name)"
            )
        scores = {g: np.array([r.mean_return for r in sorted(rs, key=lambda r: r.seed)]) for g, rs in games.items()}
        out.append(MethodScores(method, scores))
    return out


def score_record(game: str, seed: int, returns: list[float], method: str) -> dict:
    """The score.json contract read by `aggregate`."""
    mean = float(np.mean(returns))
    return {
        "game": game,
        "seed": seed,
        "episode_returns": [float(r) for r in returns],
        "mean_return": mean,
        "human_normalized_score": float(human_normalized(game, mean)),
        "num_episodes": len(returns),
        "method": method,
    }
