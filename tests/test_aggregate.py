"""Stage `aggregate`: tables, JSON, figures and the MLflow run, from real score files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from diamond.config import ConfigError
from diamond.io import ArtifactError
from diamond.results.metrics import METRICS, aggregate, score_matrix
from diamond.results.report import AGGREGATE_JSON, FIGURES, TABLE_STEM
from diamond.results.scores import REFERENCE_METHODS, atari_100k_games, load_method
from stages.aggregate import main
from conftest import ROOT, tiny_params_dict, write_params
from test_scores import write_score

OURS = "DIAMOND (this pipeline)"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def check_outputs(out: Path, columns: list[str]) -> dict:
    """Every output exists and is well formed; returns the aggregate JSON."""
    md = (out / f"{TABLE_STEM}.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Game | " + " | ".join(["Random", "Human", *columns]) + " |"
    assert [line.split(" | ")[0][2:] for line in lines[2:28]] == list(atari_100k_games())
    assert all(line.count("|") == len(columns) + 4 for line in lines)
    with open(out / f"{TABLE_STEM}.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "Random", "Human", *columns]
    labels = [r[0] for r in rows]
    assert labels[1:27] == list(atari_100k_games())
    for label in ("#Superhuman (↑)", "Mean HNS (↑)", "Mean HNS (↑) ci_low", "IQM HNS (↑) ci_high", "Optimality gap (↓)"):
        assert label in labels
    tex = (out / f"{TABLE_STEM}.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex and tex.count(" \\\\\n") >= 26 + 7
    data = json.loads((out / AGGREGATE_JSON).read_text())
    for name in columns:
        entry = data["methods"][name]
        for k in METRICS:
            lo, hi = entry[k]["ci"]
            assert lo <= entry[k]["value"] <= hi
        assert {"superhuman", "games", "runs_per_game"} <= set(entry)
    for key in ("aggregates", "profiles", "per_game", "improvement"):
        with Image.open(out / FIGURES[key]) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    return data


def params_file(tmp_path: Path, **aggregate_overrides) -> Path:
    d = tiny_params_dict()
    d["aggregate"].update(aggregate_overrides)
    return write_params(tmp_path / "params.yaml", d)


def test_reference_only_reproduces_the_published_aggregates(tmp_path, mlflow_store):
    out = tmp_path / "ref"
    main(["--params", str(params_file(tmp_path)), "--reference-only", "--out", str(out)])
    data = check_outputs(out, list(REFERENCE_METHODS))
    diamond = data["methods"]["DIAMOND"]
    # DIAMOND paper, Table 1: mean 1.459, IQM 0.641, 11 superhuman games, over 26 games x 5 seeds.
    assert diamond["mean"]["value"] == pytest.approx(1.459, abs=5e-4)
    assert diamond["iqm"]["value"] == pytest.approx(0.641, abs=5e-4)
    assert (diamond["superhuman"], diamond["games"], diamond["runs_per_game"]) == (11, 26, 5)
    assert data["methods"]["SPR"]["iqm"]["value"] == pytest.approx(0.337, abs=5e-4)
    assert data["reference_only"] and data["subsets"] == {}
    assert set(data["probability_of_improvement"]["DIAMOND"]) == set(REFERENCE_METHODS) - {"DIAMOND"}
    # One MLflow run, aggregates as metrics, tables and figures as artifacts.
    client = mlflow.MlflowClient(mlflow_store)
    (exp,) = [e for e in client.search_experiments() if e.name == "diamond-atari100k"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["stage"] == "aggregate"
    assert run.data.metrics["DIAMOND/mean"] == pytest.approx(diamond["mean"]["value"])
    assert run.data.metrics["DIAMOND/superhuman"] == 11
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert f"reports/{TABLE_STEM}.md" in artifacts and f"reports/{FIGURES['profiles']}" in artifacts


def test_partial_coverage_is_aggregated_over_its_own_games_and_said(tmp_path):
    scores = {("Breakout", 0): (40.0, 50.0), ("Breakout", 1): (20.0,), ("Pong", 0): (-21.0, -19.0), ("Pong", 1): (0.0,)}
    paths = [write_score(tmp_path / f"runs/{g}-{s}/score.json", g, s, r, OURS) for (g, s), r in scores.items()]
    out = tmp_path / "reports"
    main(["--params", str(params_file(tmp_path, reference_methods=["DIAMOND", "IRIS"])),
          "--results", *map(str, paths), "--out", str(out)])
    data = check_outputs(out, ["DIAMOND", "IRIS", OURS])
    ours = data["methods"][OURS]
    assert (ours["games"], ours["runs_per_game"], ours["game_list"]) == (2, 2, ["Breakout", "Pong"])
    hns = np.array([[(45 - 1.7) / 28.8, (-20 + 20.7) / 35.3], [(20 - 1.7) / 28.8, (0 + 20.7) / 35.3]])
    assert ours["mean"]["value"] == pytest.approx(hns.mean())
    assert data["methods"]["DIAMOND"]["games"] == 26  # the baselines keep their 26 games ...
    sub = data["subsets"][OURS]  # ... and are also aggregated over exactly ours, side by side
    assert sub["games"] == ["Breakout", "Pong"]
    expected = aggregate([score_matrix(load_method("DIAMOND"), ["Breakout", "Pong"])], 50, 0.95, 0)["DIAMOND"]
    assert sub["methods"]["DIAMOND"]["mean"]["value"] == pytest.approx(expected.estimates["mean"].value)
    assert sub["methods"]["DIAMOND"]["games"] == 2
    assert data["probability_of_improvement"][OURS]["IRIS"]["games"] == 2
    md = (out / f"{TABLE_STEM}.md").read_text()
    assert "† DIAMOND (this pipeline) is evaluated on 2 of 26 games (Breakout, Pong)" in md
    assert "| Alien | 227.8 | 7127.7 | **744.1** | 420.0 | – |" in md  # no score where there is none
    assert f"| Mean HNS (↑), 2 games of {OURS} |" in md
    mean_row = next(line for line in md.splitlines() if line.startswith("| Mean HNS (↑) |"))
    assert mean_row.rstrip(" |").endswith("]†")


def test_uneven_seeds_are_flagged(tmp_path):
    paths = [write_score(tmp_path / f"r{s}/score.json", "Boxing", s, (10.0 + s,), OURS) for s in range(3)]
    paths.append(write_score(tmp_path / "p/score.json", "Pong", 0, (1.0,), OURS))
    out = tmp_path / "reports"
    main(["--params", str(params_file(tmp_path, reference_methods=["IRIS"])), "--results", *map(str, paths), "--out", str(out)])
    data = json.loads((out / AGGREGATE_JSON).read_text())
    assert data["methods"][OURS]["runs_per_game"] == 1 and data["methods"][OURS]["runs_available"] == [1, 3]
    assert data["per_game"][OURS]["Boxing"] == {"mean_return": 11.0, "human_normalized_score": pytest.approx((11 - 0.1) / 12), "runs": 3}
    assert "has 1 to 3 runs per game" in (out / f"{TABLE_STEM}.md").read_text()


def test_bad_inputs_are_clear_errors(tmp_path):
    good = write_score(tmp_path / "good/score.json", method=OURS)
    bad = write_score(tmp_path / "bad/score.json", override={"mean_return": 1e9})
    p = str(params_file(tmp_path))
    with pytest.raises(ArtifactError, match=f"{bad}: mean_return"):
        main(["--params", p, "--results", str(good), str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(ArtifactError, match="missing.json: file not found"):
        main(["--params", p, "--results", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--reference-only takes no --results"):
        main(["--params", p, "--reference-only", "--results", str(good), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--results: no score files given"):
        main(["--params", p, "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="unknown method 'MuZero'; allowed: DIAMOND"):
        main(["--params", str(params_file(tmp_path, reference_methods=["MuZero"])), "--reference-only", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="aggregate.confidence: 95.0"):
        main(["--params", str(params_file(tmp_path, confidence=95.0)), "--reference-only", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_command_line_error_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "runs/Pong-0/score.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"game": "Pong", "seed": 0}')
    proc = subprocess.run(
        [sys.executable, "-m", "stages.aggregate", "--params", str(params_file(tmp_path)),
         "--results", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1  # one line, no traceback
    assert proc.stderr.startswith(f"error: {bad}: missing key 'episode_returns'; a score file holds game, seed,")


def test_committed_reference_reports_are_well_formed_and_current(tmp_path):
    committed = ROOT / "reports" / "reference"
    data = check_outputs(committed, list(REFERENCE_METHODS))
    fresh = tmp_path / "ref"
    main(["--params", str(params_file(tmp_path)), "--reference-only", "--out", str(fresh)])
    new = json.loads((fresh / AGGREGATE_JSON).read_text())
    for name in REFERENCE_METHODS:  # point estimates do not depend on the bootstrap size
        for k in METRICS:
            assert data["methods"][name][k]["value"] == pytest.approx(new["methods"][name][k]["value"], abs=1e-12)
    assert data["per_game"] == new["per_game"]
