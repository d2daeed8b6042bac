"""Results moved between machines stay current (README, "Sharing results"): made by `dvc repro` or
by `snakemake`, pushed to a DVC remote, pulled into a fresh clone, neither tool reruns anything;
a params or code change reruns exactly what reads it; a half-restored run reruns that job and
what follows it; file times play no part (stages/provenance.py). Real `git`, `dvc`
(a local directory remote) and `snakemake` in temporary repos."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from pipeline_repo import commit_all, copy_run, git, run_tool, set_param
from test_pipeline_snakemake import dry_run
from test_provenance import dvc_changed

NOTHING = "Nothing to be done"
RUN = "runs/Breakout-0"


def publish(origin: Path, store: Path, remote: Path) -> None:
    """What a cluster's login node does after its runs: commit dvc.lock and the reports, push."""
    run_tool(origin, store, "dvc", "remote", "add", "--default", "shared", str(remote))
    commit_all(origin, "results")
    run_tool(origin, store, "dvc", "push")


def pull_clone(origin: Path, dest: Path, store: Path) -> Path:
    """What a second machine does: clone the project and pull the results."""
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    run_tool(dest, store, "dvc", "pull")
    return dest


def scramble_mtimes(repo: Path, seed: int) -> None:
    """Every file and folder of the clone dated at random, up to a year before or after now, so
    that inputs and outputs are older and newer than each other in no particular order."""
    rng = random.Random(seed)
    now = time.time()
    for p in sorted(repo.rglob("*")):
        if ".git" not in p.relative_to(repo).parts:
            t = now + rng.uniform(-3e7, 3e7)
            os.utime(p, (t, t), follow_symlinks=False)


def assert_current(repo: Path, store: Path) -> None:
    assert dvc_changed(repo, store) == set()
    assert NOTHING in run_tool(repo, store, "snakemake", "-n")


@pytest.fixture(scope="module")
def dvc_made(tmp_path_factory: pytest.TempPathFactory, dvc_tiny_run: dict) -> dict:
    """Results made by `dvc repro` (this module's copy of conftest.dvc_tiny_run) and pushed to a
    local DVC remote."""
    tmp = tmp_path_factory.mktemp("share_dvc")
    repo, store = copy_run(dvc_tiny_run, tmp)
    origin = repo.rename(tmp / "origin")
    publish(origin, store, tmp / "remote")
    return {"tmp": tmp, "origin": origin, "store": store}


@pytest.mark.slow
def test_dvc_results_pulled_elsewhere_are_current_for_both_tools(dvc_made: dict) -> None:
    clone = pull_clone(dvc_made["origin"], dvc_made["tmp"] / "laptop", dvc_made["store"])
    assert (clone / RUN / ".provenance" / "train-agent.json").is_file()  # the record came with the outputs
    assert_current(clone, dvc_made["store"])
    for seed in (1, 2):
        scramble_mtimes(clone, seed)
        assert_current(clone, dvc_made["store"])


@pytest.mark.slow
def test_after_a_pull_a_change_reruns_exactly_what_reads_it(dvc_made: dict) -> None:
    store = dvc_made["store"]
    clone = pull_clone(dvc_made["origin"], dvc_made["tmp"] / "changes", store)
    params, module = clone / "params.yaml", clone / "stages" / "evaluate.py"
    original, code = params.read_text(), module.read_text()
    for seed in (3, 4):
        scramble_mtimes(clone, seed)
        set_param(clone, "evaluate.episodes", 3)
        assert dvc_changed(clone, store) == {"evaluate@Breakout-0"}  # aggregate follows when it reruns
        assert dry_run(clone, store) == {"evaluate": 1, "aggregate": 1, "all": 1}
        params.write_text(original)
        module.write_text(code + "\n# edited\n")
        assert dvc_changed(clone, store) == {"evaluate@Breakout-0"}
        assert dry_run(clone, store) == {"evaluate": 1, "aggregate": 1, "all": 1}
        module.write_text(code)
        assert_current(clone, store)
    # and run for real, the inputs dated a year ahead (a copy from a machine whose clock runs
    # ahead: Snakemake's clock-skew check fails a job whose input is newer than its new outputs):
    # Snakemake reruns the two jobs, commits them to dvc.lock, and both tools agree
    ahead = time.time() + 3e7
    for path in (clone / RUN).rglob("*"):
        os.utime(path, (ahead, ahead))
    set_param(clone, "evaluate.episodes", 3)
    out = run_tool(clone, store, "snakemake", "-j", "2")
    assert "provenance: rerun evaluate@Breakout-0: " in out
    scramble_mtimes(clone, 5)
    assert_current(clone, store)


@pytest.mark.slow
def test_a_half_restored_run_reruns_that_job_and_what_follows(dvc_made: dict) -> None:
    store = dvc_made["store"]
    clone = pull_clone(dvc_made["origin"], dvc_made["tmp"] / "half", store)
    checkpoint = clone / RUN / "world_model.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])  # a transfer cut off halfway
    scramble_mtimes(clone, 6)
    # DVC: the job, and the jobs that read what changed (evaluate follows if train-agent's output changes)
    assert dvc_changed(clone, store) == {"train-world-model@Breakout-0", "train-agent@Breakout-0", "aggregate"}
    assert dry_run(clone, store) == {"train_world_model": 1, "train_agent": 1, "evaluate": 1, "aggregate": 1, "all": 1}
    out = run_tool(clone, store, "snakemake", "-n")
    reasons = [line for line in out.splitlines() if line.startswith("provenance: rerun ")]
    assert any(f"{RUN}/world_model.pt is {len(good) // 2} bytes, its provenance record says {len(good)}" in line
               for line in reasons), reasons
    assert any("train-agent@Breakout-0: train-world-model@Breakout-0 runs before it" in line for line in reasons)
    checkpoint.write_bytes(good)
    # one file of a directory output lost: the job that wrote it reruns, with what reads it
    episode = sorted((clone / RUN / "dataset").rglob("*.npz"))[0]
    episode.unlink()
    assert dvc_changed(clone, store) == {"train-agent@Breakout-0", "evaluate@Breakout-0", "aggregate"}
    assert dry_run(clone, store) == {"train_agent": 1, "evaluate": 1, "aggregate": 1, "all": 1}
    assert f"{episode.relative_to(clone).as_posix()} is missing" in run_tool(clone, store, "snakemake", "-n")
    # a declared output missing altogether: DVC and Snakemake both say so
    run_tool(clone, store, "dvc", "checkout")
    assert_current(clone, store)
    (clone / RUN / "score.json").unlink()
    assert dvc_changed(clone, store) == {"evaluate@Breakout-0", "aggregate"}
    assert dry_run(clone, store) == {"evaluate": 1, "aggregate": 1, "all": 1}


@pytest.mark.slow
def test_snakemake_results_pulled_elsewhere_are_current_for_both_tools(
        tmp_path: Path, snakemake_tiny_run: dict) -> None:
    repo, store = copy_run(snakemake_tiny_run, tmp_path)  # by `snakemake -j 2`: each job commits itself to dvc.lock
    origin = repo.rename(tmp_path / "origin")
    publish(origin, store, tmp_path / "remote")
    clone = pull_clone(origin, tmp_path / "laptop", store)
    assert_current(clone, store)
    scramble_mtimes(clone, 7)
    assert_current(clone, store)
    set_param(clone, "evaluate.episodes", 3)
    assert dvc_changed(clone, store) == {"evaluate@Breakout-0"}
    assert dry_run(clone, store) == {"evaluate": 1, "aggregate": 1, "all": 1}
