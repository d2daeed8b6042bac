"""The Snakefile: the same DAG as dvc.yaml, run for real with two parallel jobs on a shared
SQLite MLflow store, two GPU jobs packed on one (here absent) GPU giving the artifacts of one job
at a time, rerunning only what a change invalidates (never on timestamps alone, never on the
scheduling key runs_per_gpu), and the paper-scale and SLURM-profile dry runs."""

from __future__ import annotations

import os
import random
import re
import time
import types
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline_repo import STAGES, assert_same_run, make_repo, mlflow_runs, pipeline_params, run_tool, set_param

RULES = ("collect", "train_world_model", "train_agent", "evaluate")


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run: rule -> number of jobs."""
    table = dry_run_output.split("Job stats:", 1)[1] if "Job stats:" in dry_run_output else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def dry_run(repo: Path, store: Path, *args: str) -> dict[str, int]:
    return job_counts(run_tool(repo, store, "snakemake", "-n", "--quiet", "rules", *args))


@pytest.fixture(scope="module")
def paper_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone (default params unchanged) where the paper config is chosen on the command line."""
    tmp = tmp_path_factory.mktemp("smk_paper")
    return make_repo(tmp / "repo", yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_paper_scale_dry_run_lists_26_games_by_5_seeds(paper_repo: Path, tmp_path: Path) -> None:
    counts = dry_run(paper_repo, tmp_path / "m.db", "--config", "params=configs/paper.yaml")
    assert counts == {**{r: 130 for r in RULES}, "aggregate": 1, "all": 1}


def test_slurm_profile_dry_run_requests_gpus_for_training(paper_repo: Path, tmp_path: Path) -> None:
    out = run_tool(paper_repo, tmp_path / "m.db", "snakemake", "--profile", "profiles/slurm", "-n",
                   "--config", "params=configs/paper.yaml")
    assert job_counts(out)["train_agent"] == 130
    resources = dict(re.findall(r"^rule (\w+):.*?^\s+resources: ([^\n]+)", out, re.M | re.S))
    for rule in ("train_world_model", "train_agent"):
        assert "gpu=1" in resources[rule] and "runtime=" in resources[rule] and "mem_mb=" in resources[rule]
    assert "gpu=1" not in resources["collect"]
    assert (ROOT / "profiles" / "slurm" / "config.yaml").read_text().count("executor: slurm") == 1


def dry_run_resources(out: str) -> dict[str, dict[str, str]]:
    """rule -> its resources (name -> value) as a dry run prints them."""
    found = re.findall(r"^rule (\w+):.*?^\s+resources: ([^\n]+)", out, re.M | re.S)
    return {rule: dict(kv.split("=", 1) for kv in res.split(", ")) for rule, res in found}


def test_slurm_profile_packs_k_gpu_jobs_per_gpu_on_shards(paper_repo: Path, tmp_path: Path) -> None:
    """With runs_per_gpu 2 a GPU job asks SLURM for one GPU shard instead of a whole GPU, as the
    executor plugin submits it (`--gres=shard:1`, no `--gpus`), and one `gpu_share` locally;
    other jobs for neither. tests/test_slurm_packing.py runs such jobs on a real cluster."""
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    packed = yaml.safe_load((paper_repo / "configs" / "paper.yaml").read_text())
    packed["runs_per_gpu"] = 2
    (tmp_path / "packed.yaml").write_text(yaml.safe_dump(packed, sort_keys=False))
    out = run_tool(paper_repo, tmp_path / "m.db", "snakemake", "--profile", "profiles/slurm", "-n",
                   "--config", f"params={tmp_path / 'packed.yaml'}")
    resources = dry_run_resources(out)
    for rule in ("train_world_model", "train_agent", "evaluate"):
        r = resources[rule]
        assert (r["gres"], r["gpu"], r["gpu_share"]) == ("shard:1", "0", "1"), rule
        typed = {k: int(v) if v.isdigit() else v for k, v in r.items()}  # as Snakemake holds them
        job = types.SimpleNamespace(resources=types.SimpleNamespace(get=typed.get, gres=typed["gres"]))
        assert set_gres_string(job) == " --gres=shard:1"
    r = resources["collect"]
    assert "gres" not in r and (r["gpu"], r["gpu_share"]) == ("0", "0")


def test_cpu_params_request_no_gpu(paper_repo: Path, tmp_path: Path) -> None:
    out = run_tool(paper_repo, tmp_path / "m.db", "snakemake", "-n")  # params.yaml: device cpu
    assert "gpu=1" not in out and job_counts(out)["train_agent"] == 1


# ---------------------------------------------------------------------------------------
# End to end: two seeds, `snakemake -j 2`
# ---------------------------------------------------------------------------------------


def packing_params() -> dict:
    """Two seeds of the tiny pipeline with `device: auto` (CPU here, so the GPU rules ask for a
    gpu_share as on a GPU machine) and two runs per GPU."""
    d = pipeline_params(seeds=[0, 1])
    d.update(device="auto", runs_per_gpu=2)
    return d


# One thread per job in both runs (the rules ask for 2-8 on a GPU machine; -j caps them at the
# cores), so that the packed and the one-at-a-time run differ in scheduling alone.
ONE_THREAD = ["--set-threads", *(f"{rule}=1" for rule in RULES)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two seeds, two jobs at a time, the GPU ones packed two per GPU (README, "Several runs per
    GPU": `snakemake -j N --resources gpu_share=K`)."""
    tmp = tmp_path_factory.mktemp("smk_e2e")
    repo = make_repo(tmp / "repo", packing_params())
    store = tmp / "mlflow.db"
    out = run_tool(repo, store, "snakemake", "-j", "2", "--resources", "gpu_share=2", *ONE_THREAD)
    return {"repo": repo, "store": store, "out": out}


def gpu_jobs_at_once(out: str) -> int:
    """The most GPU-rule jobs Snakemake had running at one time, from its log: a job starts at
    `localrule R:` ... `jobid: N` and ends at `Finished jobid: N`."""
    running, most = set(), 0
    for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:\s+.*\n)*?\s+jobid: (\d+)|^Finished jobid: (\d+)", out, re.M):
        if m[3]:
            running.discard(m[3])
        elif m[1] in ("train_world_model", "train_agent", "evaluate"):
            running.add(m[2])
            most = max(most, len(running))
    return most


@pytest.mark.slow
def test_two_parallel_jobs_run_every_stage_and_lose_no_mlflow_run(pipeline: dict) -> None:
    repo = pipeline["repo"]
    for seed in (0, 1):
        assert (repo / f"runs/Breakout-{seed}/score.json").is_file()
        for rule in RULES:
            assert (repo / f"logs/{rule}/Breakout-{seed}.log").is_file()
    assert "| Breakout " in (repo / "reports" / "atari100k_table.md").read_text()
    runs = mlflow_runs(pipeline["store"])
    expected = {f"{s}/Breakout-{seed}" for s in STAGES for seed in (0, 1)} | {"aggregate"}
    assert sorted(runs["tags.mlflow.runName"]) == sorted(expected)
    assert (runs["status"] == "FINISHED").all()
    ids = set(runs["tags.pipeline_id"])
    assert len(ids) == 1 and ids.pop().startswith("snakemake-")
    for _, run in runs.iterrows():
        metrics = [c for c in runs.columns if c.startswith("metrics.")]
        assert run[metrics].notna().any(), run["tags.mlflow.runName"]


@pytest.mark.slow
def test_nothing_reruns_and_timestamps_alone_trigger_nothing(pipeline: dict) -> None:
    repo, store = pipeline["repo"], pipeline["store"]
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")
    # New timestamps in random order, same content: inputs older and newer than their outputs
    rng = random.Random(0)
    for p in sorted((repo / "runs").rglob("*")) + sorted((repo / "reports").rglob("*")):
        t = time.time() + rng.uniform(-3e7, 3e7)
        os.utime(p, (t, t))
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")


@pytest.mark.slow
def test_changes_rerun_exactly_the_stages_that_read_them(pipeline: dict) -> None:
    repo, store = pipeline["repo"], pipeline["store"]
    original = (repo / "params.yaml").read_text()
    try:
        set_param(repo, "world_model.reward_end_steps", 5)
        assert dry_run(repo, store) == {"train_world_model": 2, "train_agent": 2, "evaluate": 2, "aggregate": 1,
                                        "all": 1}
        (repo / "params.yaml").write_text(original)
        set_param(repo, "evaluate.episodes", 3)
        assert dry_run(repo, store) == {"evaluate": 2, "aggregate": 1, "all": 1}
        (repo / "params.yaml").write_text(original)
        set_param(repo, "aggregate.bootstrap_reps", 20)
        assert dry_run(repo, store) == {"aggregate": 1, "all": 1}
        (repo / "params.yaml").write_text(original)
        # scheduling only (in no stage's rerun keys): a tree built packed is current unpacked
        set_param(repo, "runs_per_gpu", 1)
        assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")
    finally:
        (repo / "params.yaml").write_text(original)
    # a source change reruns the stages that import it
    evaluate_py = repo / "stages" / "evaluate.py"
    code = evaluate_py.read_text()
    try:
        evaluate_py.write_text(code + "\n# changed\n")
        assert dry_run(repo, store) == {"evaluate": 2, "aggregate": 1, "all": 1}
    finally:
        evaluate_py.write_text(code)
    assert "Nothing to be done" in run_tool(repo, store, "snakemake", "-n")


@pytest.mark.slow
def test_packed_gpu_jobs_give_the_artifacts_of_one_job_at_a_time(pipeline: dict, tmp_path: Path) -> None:
    """The same params run one job at a time (`snakemake -j 1`) make the packed run's artifacts,
    byte for byte or tensor for tensor: packing changes when a job runs, not what it computes
    (on a GPU each packed process also caps its memory, diamond/allocator.py cap_gpu_memory,
    which moves no number either: tests/test_allocator.py)."""
    assert gpu_jobs_at_once(pipeline["out"]) == 2, pipeline["out"][-4000:]
    alone = make_repo(tmp_path / "alone", packing_params())
    out = run_tool(alone, tmp_path / "alone.db", "snakemake", "-j", "1")
    assert gpu_jobs_at_once(out) == 1
    for seed in (0, 1):
        assert_same_run(pipeline["repo"] / f"runs/Breakout-{seed}", alone / f"runs/Breakout-{seed}")
    packed = pipeline["repo"] / "reports/atari100k_table.md"
    assert packed.read_text() == (alone / "reports/atari100k_table.md").read_text()
