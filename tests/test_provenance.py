"""Neither pipeline tool takes the other's outputs for up to date when other params or code built
them (stages/provenance.py). Real `dvc` and `snakemake` runs in temporary git repos."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_repo import copy_run, dvc_stages_run, pipeline_params, run_tool, set_param
from stages.layout import all_jobs
from stages.provenance import stage_key
from test_pipeline_snakemake import RULES, dry_run

JOBS = {r: 1 for r in RULES}


def dvc_changed(repo: Path, store: Path) -> set[str]:
    """Stage names `dvc status` reports as changed."""
    out = run_tool(repo, store, "dvc", "status", stdout_only=True)
    return {line.rstrip(":").strip() for line in out.splitlines() if line and not line.startswith((" ", "\t"))} - {
        "Data and pipelines are up to date."}


def test_keys_change_exactly_downstream_of_a_params_key() -> None:
    params = pipeline_params([0])
    before = {job: stage_key(params, *job) for job in all_jobs(params)}
    params["evaluate"]["episodes"] += 1
    after = {job: stage_key(params, *job) for job in all_jobs(params)}
    assert {job[0] for job in before if before[job] != after[job]} == {"evaluate", "aggregate"}
    params["released"]["games"] = ["Pong"]
    assert stage_key(params, "aggregate") != after[("aggregate", None, None)]


@pytest.fixture(scope="module")
def dvc_first(tmp_path_factory: pytest.TempPathFactory, dvc_tiny_run: dict) -> dict:
    """This module's copy of the session's first `dvc repro` (conftest.dvc_tiny_run)."""
    repo, store = copy_run(dvc_tiny_run, tmp_path_factory.mktemp("prov_dvc"))
    return {"repo": repo, "store": store}


@pytest.mark.slow
def test_after_dvc_snakemake_sees_what_is_current_and_what_is_not(dvc_first: dict) -> None:
    repo, store = dvc_first["repo"], dvc_first["store"]
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")
    # another params file: every run of it, Breakout-0's included, although DVC built a Breakout-0
    counts = dry_run(repo, store, "--config", "params=configs/paper.yaml")
    assert {r: counts[r] for r in RULES} == {r: 130 for r in RULES} and counts["aggregate"] == 1
    original = (repo / "params.yaml").read_text()
    try:
        set_param(repo, "evaluate.episodes", 3)
        assert dvc_changed(repo, store) == {"evaluate@Breakout-0"}  # aggregate follows when it reruns
        assert dry_run(repo, store) == {"evaluate": 1, "aggregate": 1, "all": 1}
    finally:
        (repo / "params.yaml").write_text(original)
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")


@pytest.mark.slow
def test_a_code_edit_reruns_its_stage_and_what_follows_under_both_tools(dvc_first: dict) -> None:
    repo, store = dvc_first["repo"], dvc_first["store"]
    module = repo / "stages" / "train_agent.py"
    code = module.read_text()
    try:
        module.write_text(code + "\n# edited\n")
        assert dvc_changed(repo, store) == {"train-agent@Breakout-0"}  # DVC finds the rest when it reruns it
        assert dry_run(repo, store) == {"train_agent": 1, "evaluate": 1, "aggregate": 1, "all": 1}
    finally:
        module.write_text(code)


@pytest.mark.slow
def test_after_snakemake_dvc_sees_its_work_and_reruns_exactly_what_changed(
        tmp_path: Path, snakemake_tiny_run: dict) -> None:
    repo, store = copy_run(snakemake_tiny_run, tmp_path)  # made by `snakemake -j 2`
    assert dvc_changed(repo, store) == set()  # every job committed to dvc.lock by `stages.pipeline done`
    set_param(repo, "evaluate.episodes", 3)
    assert dvc_changed(repo, store) == {"evaluate@Breakout-0"}
    assert dvc_stages_run(run_tool(repo, store, "dvc", "repro")) == {"evaluate@Breakout-0", "aggregate"}
    # and DVC's rerun is current for Snakemake too
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")
    # Snakemake under another params file overwrites Breakout-0: DVC must not call it current
    paper_like = yaml.safe_load((repo / "params.yaml").read_text())
    paper_like["agent"]["epsilon"] = 0.02
    (repo / "other.yaml").write_text(yaml.safe_dump(paper_like, sort_keys=False))
    run_tool(repo, store, "snakemake", "-j", "2", "--config", "params=other.yaml")
    assert {"train-agent@Breakout-0", "evaluate@Breakout-0", "aggregate"} <= dvc_changed(repo, store)
    assert dry_run(repo, store) == {"train_agent": 1, "evaluate": 1, "aggregate": 1, "all": 1}
