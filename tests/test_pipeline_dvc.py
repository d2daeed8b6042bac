"""dvc.yaml: declared params and code match what the stages read, and the real `dvc repro` on a
fresh clone runs every stage once, reruns exactly what a change invalidates, and leaves one
MLflow run per stage with its tags, metrics and DVC input hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline_repo import (STAGES, commit_all, copy_run, dvc_stages_run, git, make_repo, mlflow_runs,
                           run_tool, set_param)
from stages.layout import STAGE_DATA, code_files, stage_code_files
from stages.stage_params import STAGE_PARAMS

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
RUN = "runs/Breakout-0"


def stage_def(name: str) -> dict:
    """A stage's definition; `foreach` stages keep it under `do`."""
    return DVC_YAML[name].get("do", DVC_YAML[name])


def _path(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


@pytest.mark.parametrize("stage", sorted(STAGE_PARAMS))
def test_declared_params_are_what_the_stage_reads(stage: str) -> None:
    assert stage_def(stage)["params"] == STAGE_PARAMS[stage]


def test_the_scheduling_key_reruns_no_stage() -> None:
    """runs_per_gpu decides how many runs share a GPU, not what they compute (README, "Several
    runs per GPU"): in no stage's params, so no pipeline reruns a stage when it changes."""
    assert not [s for s, keys in STAGE_PARAMS.items() if any(k.split(".")[0] == "runs_per_gpu" for k in keys)]


@pytest.mark.parametrize("stage", sorted(STAGE_PARAMS))
def test_declared_code_deps_are_the_stage_imports(stage: str) -> None:
    """Every project file the stage imports (transitively) is a dependency, and nothing else:
    a new import without a dvc.yaml entry would let stale outputs pass as up to date."""
    # data dependencies: run artifacts, the study's dataset (a params value) and study jobs' outputs
    deps = [_path(d) for d in stage_def(stage)["deps"] if not _path(d).startswith(("runs", "${study.dataset}", "study/"))]
    expected = stage_code_files(stage) + STAGE_DATA.get(stage, [])
    if stage == "aggregate":
        expected += code_files("stages.pipeline")  # its command lists the score files
    assert sorted(deps) == sorted(set(expected))


@pytest.mark.parametrize("stage", sorted(STAGE_PARAMS))
def test_stages_log_the_params_they_declare(stage: str) -> None:
    """The stages hash and log what STAGE_PARAMS declares for them (stages.common.stage_sections)."""
    from conftest import tiny_params_dict
    from diamond.config import params_from_dict
    from stages.common import stage_sections
    from stages.run_tags import params_hash_of

    sections = stage_sections(params_from_dict(tiny_params_dict()), stage)
    assert set(sections) == {k.split(".")[0] for k in STAGE_PARAMS[stage]}
    params_hash_of(sections)  # hashable as the MLflow tags need


# Modules of the tables, figures and reference scores: editing them must not rerun training.
REPORTING_MODULES = {"diamond/results/scores.py", "diamond/results/metrics.py", "diamond/results/report.py", "diamond/results/released_report.py",
                     "diamond/results/study_report.py", "stages/aggregate.py", "stages/study_report.py", "stages/pipeline.py",
                     "stages/layout.py", "stages/provenance.py"}


@pytest.mark.parametrize("stage", ["collect", "train-world-model", "train-agent"])
def test_training_stages_do_not_depend_on_the_reporting_modules(stage: str) -> None:
    deps = {_path(d) for d in stage_def(stage)["deps"]}
    assert not deps & REPORTING_MODULES
    assert not any(d.startswith("diamond/results/reference_data") for d in deps)


def test_resume_scratch_is_not_an_output() -> None:
    outs = [_path(o) for s in DVC_YAML.values() for o in s.get("outs", [])]
    assert not [o for o in outs if "agent_state" in o]
    assert "--state-dir runs/${item.game}-${item.seed}/agent_state" in DVC_YAML["train-agent"]["cmd"]


def test_paper_scale_has_a_stage_per_game_seed_and_step(tmp_path: Path) -> None:
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    repo = make_repo(tmp_path / "repo", paper)
    out = run_tool(repo, tmp_path / "mlflow.db", "dvc", "stage", "list", "--name-only")
    names = out.split()
    assert len(names) == 26 * 5 * 4 + 1
    for stage in STAGES:
        assert sum(n.startswith(stage + "@") for n in names) == 130
    assert {"collect@Alien-0", "evaluate@UpNDown-4", "aggregate"} <= set(names)


# ---------------------------------------------------------------------------------------
# End to end, in a temporary clone: real ALE, real training, real DVC and MLflow
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, dvc_tiny_run: dict) -> dict:
    """This module's copy of the session's first `dvc repro` (conftest.dvc_tiny_run)."""
    repo, store = copy_run(dvc_tiny_run, tmp_path_factory.mktemp("dvc_e2e"))
    return {"repo": repo, "store": store, "first": dvc_tiny_run["out"]}


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_the_table(pipeline: dict) -> None:
    repo = pipeline["repo"]
    assert dvc_stages_run(pipeline["first"]) == {f"{s}@Breakout-0" for s in STAGES} | {"aggregate"}
    for name in ("collect.json", "world_model.json", "agent.json", "score.json", "evaluate_fidelity.json",
                 "world_model.pt", "agent.pt", "world_model_curve.csv", "agent_curve.csv"):
        assert (repo / RUN / name).is_file(), name
    score = json.loads((repo / RUN / "score.json").read_text())
    assert score["game"] == "Breakout" and score["seed"] == 0 and score["num_episodes"] == 2
    table = (repo / "reports" / "atari100k_table.md").read_text()
    breakout = next(line for line in table.splitlines() if line.startswith("| Breakout "))
    assert f"{score['mean_return']:.1f}" in breakout  # this run's score beside the baselines
    # every file the aggregate stage writes is declared, so none is left unversioned
    declared = {_path(o) for key in ("outs", "plots") for o in DVC_YAML["aggregate"][key]}
    written = {f"reports/{p.name}" for p in (repo / "reports").iterdir() if p.is_file()}
    written |= {f"reports/.provenance/{p.name}" for p in (repo / "reports" / ".provenance").iterdir()}
    assert written == declared  # the provenance record included: it travels with the table


@pytest.mark.slow
def test_every_stage_is_an_mlflow_run_with_tags_metrics_and_dvc_hashes(pipeline: dict) -> None:
    repo, runs = pipeline["repo"], mlflow_runs(pipeline["store"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    commit = git(repo, "rev-parse", "HEAD").strip()
    # every path DVC hashed: stage dependencies and outputs (score.json is aggregate's input)
    dvc_md5 = {e["path"]: e["md5"] for s in lock.values() for k in ("deps", "outs") for e in s.get(k, [])}
    assert set(runs["tags.mlflow.runName"]) == {f"{s}/Breakout-0" for s in STAGES} | {"aggregate"}
    assert (runs["status"] == "FINISHED").all()
    assert runs["tags.pipeline_id"].nunique() == 1  # one invocation, one id
    assert (runs["tags.git_commit"] == commit).all()
    metric_cols = [c for c in runs.columns if c.startswith("metrics.")]
    for _, run in runs.iterrows():
        stage = run["tags.stage"]
        if stage != "aggregate":
            assert (run["tags.game"], run["tags.seed"]) == ("Breakout", "0")
        assert run["tags.params_hash"]
        assert run[metric_cols].notna().any(), f"{stage}: no metrics logged"
        # the torch stages kept freed memory in the process, as params.yaml asks (glibc here)
        in_force = run.get("tags.reuse_freed_memory_in_force")  # NaN where a run has no such tag
        if stage in ("train-world-model", "train-agent", "evaluate"):
            assert in_force == "True", stage
        else:
            assert not isinstance(in_force, str), stage
        # the sections the stage hashes are among the params keys dvc.yaml declares for it
        declared_sections = {k.split(".")[0] for k in STAGE_PARAMS[stage]}
        assert set(run["tags.params_sections"].split(",")) <= declared_sections | {"method_name"}, stage
        # input hashes: the md5 DVC recorded for the same path
        inputs = {c.removeprefix("tags.dvc_md5."): run[c] for c in runs.columns
                  if c.startswith("tags.dvc_md5.") and isinstance(run[c], str)}
        assert (stage == "collect") == (not inputs), f"{stage}: inputs {sorted(inputs)}"
        for path, md5 in inputs.items():
            assert md5 == dvc_md5[path], (stage, path)


@pytest.mark.slow
def test_second_repro_runs_nothing(pipeline: dict) -> None:
    out = run_tool(pipeline["repo"], pipeline["store"], "dvc", "repro")
    assert dvc_stages_run(out) == set()
    assert "Data and pipelines are up to date" in run_tool(pipeline["repo"], pipeline["store"], "dvc", "status")


@pytest.mark.slow
def test_world_model_change_reruns_it_and_what_follows_not_collect(pipeline: dict) -> None:
    repo, store = pipeline["repo"], pipeline["store"]
    commit_all(repo, "baseline results")
    set_param(repo, "world_model.reward_end_steps", 5)
    out = run_tool(repo, store, "dvc", "repro")
    assert dvc_stages_run(out) == {"train-world-model@Breakout-0", "train-agent@Breakout-0",
                                   "evaluate@Breakout-0", "aggregate"}
    runs = mlflow_runs(store)
    assert (runs["tags.mlflow.runName"] == "collect/Breakout-0").sum() == 1
    assert runs["tags.pipeline_id"].nunique() == 2  # the new params make a new invocation id


@pytest.mark.slow
def test_episode_count_experiment_reruns_only_evaluate_and_aggregate(pipeline: dict) -> None:
    repo, store = pipeline["repo"], pipeline["store"]
    commit_all(repo, "baseline for the experiment")
    out = run_tool(repo, store, "dvc", "exp", "run", "-S", "evaluate.episodes=3")
    assert dvc_stages_run(out) == {"evaluate@Breakout-0", "aggregate"}
    assert json.loads((repo / RUN / "score.json").read_text())["num_episodes"] == 3
    diff = json.loads(run_tool(repo, store, "dvc", "metrics", "diff", "--json", stdout_only=True))
    assert diff[f"{RUN}/score.json"]["num_episodes"] == {"old": 2, "new": 3, "diff": 1}
    exps = run_tool(repo, store, "dvc", "exp", "show", "--csv", stdout_only=True)
    assert "evaluate.episodes" in exps.splitlines()[0] and ",3," in exps
    run_tool(repo, store, "dvc", "plots", "show", "-o", "plots_html")
    assert (repo / "plots_html" / "index.html").is_file()
