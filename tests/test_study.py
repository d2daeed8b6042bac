"""The world-model study (diamond/world_model/study.py, diamond/results/study_report.py; stages study, study-report):
its metrics on hand-made frames, the repeat-last baseline, the bootstrap table, params errors,
and one tiny end-to-end run through real DVC."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict
from diamond.config import ConfigError, StudyVariant, params_from_dict
from diamond.data import Episode
from diamond.results.study_errors import bootstrap_mean_ci, per_step_means
from diamond.results.study_report import BASELINE, summarize, table_csv, table_markdown
from diamond.world_model.study import frame_errors, open_loop_errors, repeat_last_errors, variant_config


def test_frame_errors_on_hand_made_frames() -> None:
    zeros, halves = torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.5)
    same = frame_errors(zeros, zeros)
    assert same["mse"].tolist() == [0, 0] and same["psnr"].tolist() == [100, 100]
    assert torch.allclose(same["ssim"], torch.ones(2))
    diff = frame_errors(halves, zeros)
    assert torch.allclose(diff["mse"], torch.full((2,), 0.25))
    assert torch.allclose(diff["psnr"], torch.full((2,), 10 * math.log10(4)))
    # constant frames: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 * range)^2
    c1 = 1e-4
    assert torch.allclose(diff["ssim"], torch.full((2,), c1 / (0.25 + c1)), rtol=1e-3)


def test_repeat_last_baseline_compares_the_last_given_frame_with_each_later_one() -> None:
    frames = np.stack([np.full((3, 8, 8), 10 * k, np.uint8) for k in range(6)])[None]  # (1, L + H = 6, ...)
    valid = np.array([[True, True, True, False]])  # context 2, horizon 4, the episode ends after step 3
    err = repeat_last_errors(frames, valid, context=2)
    expected = [(10 * h / 255) ** 2 for h in range(1, 4)] + [0.0]  # frame 1 vs frames 2, 3, 4
    assert np.allclose(err["mse"][0], expected)


class RepeatLastSampler:
    """A 'world model' that repeats its last frame: its errors must equal the baseline's."""

    def sample(self, prev_obs: torch.Tensor, prev_act: torch.Tensor, generator=None) -> torch.Tensor:
        return prev_obs[:, -1]


def episode(steps: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(obs=rng.integers(0, 256, (steps + 1, 3, 16, 16), dtype=np.uint8),
                   act=rng.integers(0, 3, steps).astype(np.int64), rew=np.zeros(steps, np.float32),
                   terminated=np.zeros(steps, bool), truncated=np.zeros(steps, bool))


def test_open_loop_errors_masks_steps_past_the_episode_and_keeps_the_strip() -> None:
    eps = [episode(12, 0), episode(7, 1)]
    out = open_loop_errors(RepeatLastSampler(), eps, context=4, horizons=[1, 3, 50], rollouts_per_episode=3,
                           device=torch.device("cpu"), seed=0)
    assert out["valid"].shape[1] == 12 - 3  # stops at the longest rollout: 9 steps after frame 3
    for k in ("mse", "psnr", "ssim"):
        assert np.array_equal(out[f"model_{k}"], out[f"repeat_last_{k}"])
    assert (out["model_mse"][~out["valid"]] == 0).all()
    assert out["strip_horizons"].tolist() == [1, 3]  # h=50 is past every episode
    assert np.array_equal(out["strip_real"][0], eps[0].obs[4])


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    assert bootstrap_mean_ci([np.full(5, 2.0), np.full(3, 2.0)], 100, 0.9, rng) == (2.0, 2.0, 2.0)
    mean, lo, hi = bootstrap_mean_ci([np.arange(10.0)], 500, 0.95, rng)
    assert mean == 4.5 and 2.5 < lo < 4.5 < hi < 6.5
    # mean over seeds of per-seed means; the seeds' spread widens the interval
    mean, lo, hi = bootstrap_mean_ci([np.zeros(4), np.full(2, 10.0)], 500, 0.95, rng)
    assert mean == 5.0 and lo == 0.0 and hi == 10.0
    assert bootstrap_mean_ci([np.zeros(0)], 10, 0.95, rng) is None


def fake_errors(level: float, horizon: int = 4) -> dict[str, np.ndarray]:
    valid = np.array([[True] * horizon, [True] * 2 + [False] * (horizon - 2)])
    out: dict[str, np.ndarray] = {"valid": valid}
    for who, v in (("model", level), ("repeat_last", 0.5)):
        for k in ("mse", "psnr", "ssim"):
            out[f"{who}_{k}"] = np.where(valid, v, 0.0)
    out.update(strip_horizons=np.array([1]), strip_real=np.zeros((1, 3, 4, 4), np.uint8),
               strip_imagined=np.zeros((1, 3, 4, 4), np.uint8), strip_context=np.zeros((3, 4, 4), np.uint8))
    return out


def study_params(**study) -> dict:
    d = tiny_params_dict()
    d["study"].update(games=["Breakout"], seeds=[0, 1], horizons=[1, 3, 15], bootstrap_reps=50,
                      variants=[{"name": "edm-1", "formulation": "edm", "num_steps": 1},
                                {"name": "ddpm-3", "formulation": "ddpm", "num_steps": 3}])
    d["study"].update(study)
    return d


def test_table_has_every_variant_and_the_baseline_with_cis() -> None:
    p = params_from_dict(study_params())
    errors = {(v, s): fake_errors(0.1 if v == "edm-1" else 0.2) for v in ("edm-1", "ddpm-3") for s in (0, 1)}
    results = summarize(p.study, errors)
    assert list(results["rows"]) == ["edm-1", "ddpm-3", BASELINE]
    cell = results["rows"]["ddpm-3"]["horizons"]["3"]
    assert cell["rollouts"] == 2 and cell["mse"] == {"mean": 0.2, "ci_low": 0.2, "ci_high": 0.2}
    assert results["rows"]["edm-1"]["horizons"]["15"]["mse"] is None  # no rollout reaches h=15
    assert results["rows"][BASELINE]["horizons"]["1"]["ssim"]["mean"] == 0.5
    md = table_markdown(results)
    assert "| edm-1 | 0.10000 [0.10000, 0.10000] |" in md and f"| {BASELINE} |" in md and "n/a" in md
    rows = list(csv.DictReader(io.StringIO(table_csv(results))))
    assert len(rows) == 3 * 3 * 3 and {r["variant"] for r in rows} == {"edm-1", "ddpm-3", BASELINE}
    json.dumps(results)  # every number is JSON-ready
    assert per_step_means([errors[("edm-1", 0)]], "model_mse").tolist() == [0.1] * 4


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["variants"].append({"name": "x", "formulation": "vp", "num_steps": 1}),
     "study.variants[2].formulation: 'vp' is not one of 'edm', 'ddpm'"),
    (lambda s: s["variants"].append({"name": "edm-1", "formulation": "edm", "num_steps": 2}), "study.variants: names"),
    (lambda s: s.update(games=["Breakout", "Pong"]), "study.games: ['Breakout', 'Pong'] holds more than one game"),
    (lambda s: s.update(horizons=[15, 1]), "study.horizons: [15, 1] must be a non-empty increasing list"),
    (lambda s: s.pop("confidence"), "study.confidence: missing key"),
])
def test_bad_study_params_are_one_line_errors(edit, message: str) -> None:
    d = study_params()
    edit(d["study"])
    with pytest.raises(ConfigError) as e:
        params_from_dict(d)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_variant_config_sets_formulation_and_steps_only() -> None:
    p = params_from_dict(study_params())
    cfg = variant_config(p.world_model, StudyVariant("ddpm-3", "ddpm", 3))
    assert (cfg.denoiser.formulation, cfg.sampler.num_steps) == ("ddpm", 3)
    assert cfg.denoiser.channels == p.world_model.denoiser.channels
    with pytest.raises(ConfigError, match="num_steps: 2000 must be"):
        variant_config(p.world_model, StudyVariant("ddpm-big", "ddpm", 2000))


ROOT = Path(__file__).resolve().parents[1]


def _load_yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / name).read_text())


def test_study_configs_differ_from_their_base_only_in_the_study_keys() -> None:
    """configs/study_small.yaml is params.yaml and configs/study_paper.yaml is configs/paper.yaml,
    plus the study switched on (and, at paper scale, the one training run that collects the data)."""
    pairs = {"configs/study_small.yaml": ("params.yaml", ["seeds", "denoiser_steps", "heldout_episodes"], []),
             "configs/study_paper.yaml": ("configs/paper.yaml", [], ["games", "seeds"])}
    for study_file, (base_file, study_keys, top_keys) in pairs.items():
        study, base = _load_yaml(study_file), _load_yaml(base_file)
        assert study["study"]["games"] == ["Breakout"] and base["study"]["games"] == []
        if top_keys:
            assert (study["games"], study["seeds"]) == (["Breakout"], [0])
        for d in (study, base):
            for k in top_keys:
                d.pop(k)
            for k in study_keys + ["games"]:
                d["study"].pop(k)
        assert study == base, study_file
        params_from_dict(_load_yaml(study_file))


# ---------------------------------------------------------------------------------------
# End to end through real DVC: a tiny static dataset, 2 variants x 1 seed
# ---------------------------------------------------------------------------------------


def collect_dataset(root: Path, steps: int) -> None:
    """A uniform-policy Breakout store at 16x16 (a stand-in for an agent's dataset)."""
    from diamond.env.collector import Collector, UniformPolicy
    from diamond.data import EpisodeStore
    from diamond.env.atari import make_env, num_actions

    p = params_from_dict(study_params())
    env_cfg = dataclasses.replace(p.env, obs_size=16)
    n = num_actions("Breakout")
    store = EpisodeStore(root, game="Breakout", num_actions=n)
    env = make_env("Breakout", 0, train=True, config=env_cfg)
    collector = Collector(env, UniformPolicy(n, np.random.default_rng(0)), store)
    collector.collect(steps)
    collector.flush()
    env.close()


@pytest.mark.slow
def test_study_through_dvc_writes_the_report(tmp_path: Path) -> None:
    from pipeline_repo import dvc_stages_run, make_repo, mlflow_runs, run_tool

    d = study_params(dataset="data/static", seeds=[0], horizons=[1, 3], denoiser_steps=3, heldout_episodes=2,
                     rollouts_per_episode=2)
    d["env"]["obs_size"] = 16
    den = d["world_model"]["denoiser"]
    den.update(channels=[8, 8], cond_channels=16, num_groups_channels=8)
    repo = make_repo(tmp_path / "repo", d)
    collect_dataset(repo / "data" / "static", 300)
    store = tmp_path / "mlflow.db"
    out = run_tool(repo, store, "dvc", "repro", "study-report@Breakout")
    assert dvc_stages_run(out) == {"study@Breakout-variant0-0", "study@Breakout-variant1-0", "study-report@Breakout"}
    reports = repo / "reports" / "study"
    for name in ("study_table.md", "study_table.csv", "study.json", "study_error_vs_horizon.png", "study_frames.png"):
        assert (reports / name).is_file(), name
    table = (reports / "study_table.md").read_text()
    for row in ("| edm-1 |", "| ddpm-3 |", f"| {BASELINE} |"):
        assert table.count(row) == 3, row  # one row per metric table
    runs = mlflow_runs(store)
    assert sorted(runs["tags.study_variant"].dropna()) == ["ddpm-3", "edm-1"]
    assert (repo / "study" / "Breakout" / "edm-1-0" / ".provenance" / "study.json").is_file()
    assert "up to date" in run_tool(repo, store, "dvc", "status", "study-report@Breakout")
