"""Reference scores, score files and human normalization (diamond/results/scores.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from diamond.io import ArtifactError
from diamond.results.scores import (
    REFERENCE_DIR,
    REFERENCE_METHODS,
    atari_100k_games,
    human_normalized,
    human_scores,
    load_method,
    load_result,
    load_results,
    random_scores,
    results_by_method,
)


def write_score(
    path: Path, game: str = "Breakout", seed: int = 0, returns=(10.0, 20.0), method: str = "ours",
    override: dict | None = None,
) -> Path:
    """A score.json as stages.evaluate writes it; `override` breaks fields on purpose."""
    mean = float(np.mean(returns))
    data = {
        "game": game,
        "seed": seed,
        "episode_returns": list(returns),
        "mean_return": mean,
        "human_normalized_score": float(human_normalized(game, mean)),
        "num_episodes": len(returns),
        "method": method,
    }
    data.update(override or {})  # applied last, so a test can break any field
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_human_normalized_matches_hand_computed_values():
    # Breakout: random 1.7, human 30.5 -> 16.1 is half-way; Pong: random -20.7, human 14.6.
    assert human_normalized("Breakout", 16.1) == pytest.approx(0.5)
    assert human_normalized("Breakout", 1.7) == pytest.approx(0.0)
    assert human_normalized("Breakout", 30.5) == pytest.approx(1.0)
    assert human_normalized("Pong", -3.05) == pytest.approx(0.5)
    assert human_normalized("Pong", 21.0) == pytest.approx((21.0 + 20.7) / 35.3)
    np.testing.assert_allclose(human_normalized("Boxing", np.array([0.1, 12.1, 24.1])), [0.0, 1.0, 2.0])
    with pytest.raises(ArtifactError, match="NotAGame"):
        human_normalized("NotAGame", 1.0)


def test_games_are_the_atari_100k_games_of_the_environment():
    from diamond.env.atari import ATARI_100K_GAMES

    assert atari_100k_games() == tuple(ATARI_100K_GAMES)
    assert set(random_scores()) == set(human_scores()) == set(ATARI_100K_GAMES)


@pytest.mark.parametrize("name", REFERENCE_METHODS)
def test_every_reference_method_covers_all_games(name):
    m = load_method(name)
    assert m.games == list(atari_100k_games())
    assert all(np.all(np.isfinite(v)) and v.ndim == 1 and len(v) >= 1 for v in m.scores.values())


def test_reference_values_are_the_published_ones():
    # DIAMOND paper Table 1: Breakout 132.5, Pong 20.4; IRIS paper: Breakout 83.7.
    assert load_method("DIAMOND").per_game_mean()["Breakout"] == pytest.approx(132.5, abs=0.05)
    assert load_method("DIAMOND").per_game_mean()["Pong"] == pytest.approx(20.4, abs=0.05)
    assert load_method("IRIS").per_game_mean()["Breakout"] == pytest.approx(83.7, abs=0.05)
    assert load_method("DIAMOND").runs_per_game()["Alien"] == 5
    assert load_method("SPR").runs_per_game()["Alien"] == 100


def test_curl_records_become_raw_scores_that_normalize_back():
    records = json.loads((REFERENCE_DIR / "CURL.json").read_text())
    alien = sorted((r["seed"], r["HNS"]) for r in records if r["game"] == "Alien")
    curl = load_method("CURL")
    assert len(curl.scores["Alien"]) == len(alien) == 100
    np.testing.assert_allclose(human_normalized("Alien", curl.scores["Alien"]), [h for _, h in alien], rtol=1e-12)


def test_reference_readme_documents_every_shipped_file_with_its_checksum():
    readme = (REFERENCE_DIR / "README.md").read_text()
    shipped = sorted(p.name for p in REFERENCE_DIR.glob("*.json"))
    assert {f"{m}.json" for m in REFERENCE_METHODS} | {"HUMAN.json", "RANDOM.json"} == set(shipped)
    for name in shipped:
        digest = hashlib.sha256((REFERENCE_DIR / name).read_bytes()).hexdigest()
        assert f"`{name}`" in readme and f"{digest}  {name}" in readme, name


def test_unknown_reference_method_is_a_clear_error():
    with pytest.raises(ArtifactError, match="MuZero.*allowed: DIAMOND"):
        load_method("MuZero")


def test_load_result_reads_a_valid_score_file(tmp_path):
    r = load_result(write_score(tmp_path / "score.json", returns=(10.0, 22.2)))
    assert (r.game, r.seed, r.method, r.num_episodes) == ("Breakout", 0, "ours", 2)
    assert r.mean_return == pytest.approx(16.1)
    assert r.human_normalized_score == pytest.approx(0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"game": "Tetris"}, "game 'Tetris' is not an Atari 100k game"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"method": ""}, "method must be a non-empty string"),
        ({"episode_returns": []}, "episode_returns must be a non-empty list"),
        ({"episode_returns": [1.0, "x"]}, "episode_returns must be a non-empty list"),
        ({"mean_return": 99.0}, "mean_return 99.0 is not the mean"),
        ({"human_normalized_score": 3.0}, "human_normalized_score 3.0 does not match"),
        ({"num_episodes": 3}, "num_episodes is 3 but episode_returns holds 2"),
        ({"mean_return": float("nan")}, "mean_return must be a finite number"),
    ],
)
def test_malformed_score_file_is_an_error_naming_it(tmp_path, override, message):
    path = write_score(tmp_path / "bad" / "score.json", override=override)
    with pytest.raises(ArtifactError) as e:
        load_result(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_missing_key_missing_file_and_bad_json_name_the_file(tmp_path):
    path = write_score(tmp_path / "score.json")
    data = json.loads(path.read_text())
    del data["episode_returns"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=f"{path}: missing key 'episode_returns'"):
        load_result(path)
    with pytest.raises(ArtifactError, match="nowhere.json: file not found"):
        load_result(tmp_path / "nowhere.json")
    (tmp_path / "trunc.json").write_text('{"game": "Breakout", ')
    with pytest.raises(ArtifactError, match="trunc.json: not valid JSON"):
        load_result(tmp_path / "trunc.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="list.json: expected a JSON object"):
        load_result(tmp_path / "list.json")


def test_results_group_by_method_in_seed_order(tmp_path):
    paths = [
        write_score(tmp_path / "a" / "score.json", "Pong", seed=3, returns=(5.0,)),
        write_score(tmp_path / "b" / "score.json", "Pong", seed=1, returns=(1.0,)),
        write_score(tmp_path / "c" / "score.json", "Boxing", seed=1, returns=(2.0,)),
        write_score(tmp_path / "d" / "score.json", "Pong", seed=1, returns=(7.0,), method="model-free"),
    ]
    by = {m.name: m for m in results_by_method(load_results(paths))}
    assert set(by) == {"ours", "model-free"}
    assert by["ours"].games == ["Boxing", "Pong"]  # benchmark order, not input order
    np.testing.assert_array_equal(by["ours"].scores["Pong"], [1.0, 5.0])
    np.testing.assert_array_equal(by["model-free"].scores["Pong"], [7.0])


def test_duplicate_runs_and_name_clashes_are_errors(tmp_path):
    a = write_score(tmp_path / "a" / "score.json", seed=1)
    b = write_score(tmp_path / "b" / "score.json", seed=1)
    with pytest.raises(ArtifactError, match="duplicate result for ours Breakout seed 1"):
        load_results([a, b])
    clash = write_score(tmp_path / "c" / "score.json", method="DIAMOND")
    with pytest.raises(ArtifactError, match="clashes with the published reference column"):
        results_by_method(load_results([clash]))
    assert math.isfinite(load_results([a])[0].mean_return)
