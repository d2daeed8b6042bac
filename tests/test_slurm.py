"""The tiny pipeline through the real SLURM profile (`snakemake --profile profiles/slurm`) on a real
single-node SLURM cluster (tests/slurm_cluster.py): the train-agent job is killed by SLURM at its
time limit, the profile's `retries: 1` resubmits it, it resumes from runs/G-S/agent_state, and
every final artifact equals that of an uninterrupted local run of the same params."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_repo import assert_same_run, make_repo, mlflow_runs, pipeline_params, run_tool, tool_env
from slurm_cluster import Cluster, why_unavailable

pytestmark = pytest.mark.slow

RUN = "runs/Breakout-0"
# SLURM counts time limits in whole minutes and checks them every 30 s: a job with a 1-minute
# limit is killed between 60 and 90 s after it starts (then SIGKILL after KillWait).
FIRST_ATTEMPT_MINUTES, RETRY_MINUTES = 1, 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def slow_agent_params() -> dict:
    """The tiny pipeline, but a train-agent stage that trains for about 3.5 minutes of one quiet
    CPU core (so that the 1-minute limit, enforced 60-90 s in, kills it even on a fast machine:
    with 55 epochs it once finished in 84 s, before the kill) in ~1.5 s epochs, each checkpointed
    (so that the killed attempt leaves a state to resume, unless the CPU is so starved that it
    finishes no epoch in 60-90 s)."""
    d = pipeline_params(seeds=[0])
    d["agent"].update(final_epochs_without_collection=140, denoiser_steps_per_epoch=20,
                      reward_end_steps_per_epoch=10, actor_critic_steps_per_epoch=20, checkpoint_every_epochs=1)
    return d


def slurm_command() -> list[str]:
    """The repository's SLURM profile as a user runs it; only what this one-node test cluster
    needs differs: memory requests within its RAM, no accounting database (status from squeue),
    quicker status polling, and the short time limit of train-agent's first attempt."""
    small_memory = [f"{rule}:mem_mb=1000" for rule in ("collect", "train_world_model", "train_agent", "evaluate",
                                                        "aggregate")]
    return ["snakemake", "--profile", "profiles/slurm",
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
            "--set-resources", *small_memory,
            f"train_agent:runtime={FIRST_ATTEMPT_MINUTES} if attempt == 1 else {RETRY_MINUTES}"]


def test_time_limit_kill_is_retried_and_resumes_to_the_uninterrupted_result(cluster: Cluster, tmp_path: Path) -> None:
    params = slow_agent_params()
    repo, ref = make_repo(tmp_path / "slurm", params), make_repo(tmp_path / "local", params)
    # the uninterrupted reference runs locally meanwhile, on the machine's other core
    reference = subprocess.Popen(["snakemake", "-j", "1"], cwd=ref, env=tool_env(tmp_path / "local.db"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    start = time.monotonic()
    try:
        out = run_tool(repo, tmp_path / "slurm.db", *slurm_command(), timeout=2400, extra_env=cluster.env)
    except BaseException as e:
        os.killpg(reference.pid, signal.SIGKILL)
        reference.wait()
        raise AssertionError(f"{e}\n{cluster.logs()}") from None
    ref_out, _ = reference.communicate(timeout=2400)
    print(f"SLURM pipeline: {time.monotonic() - start:.0f} s")
    assert reference.returncode == 0, ref_out[-4000:]

    # the first train-agent job was killed by SLURM's time limit, the retry resumed and finished
    killed = re.findall(r"SLURM-job '(\d+)' failed, SLURM status is: 'TIMEOUT'", out)
    assert len(killed) == 1, out[-6000:]
    assert f"Time limit exhausted for JobId={killed[0]}" in (cluster.root / "log" / "slurmctld.log").read_text()
    log = (repo / "logs/train_agent/Breakout-0.log").read_text()
    resumed = re.search(r"resumed from \S+ at epoch (\d+)/(\d+)", log)
    assert resumed and 0 < int(resumed[1]) < int(resumed[2]), log[-3000:]
    assert "started fresh" in (ref / "logs/train_agent/Breakout-0.log").read_text()
    # SLURM's SIGTERM ended the killed attempt's MLflow run as FAILED; every other run finished
    runs = mlflow_runs(tmp_path / "slurm.db")
    agent = runs[runs["tags.mlflow.runName"] == "train-agent/Breakout-0"].sort_values("status")
    assert list(agent["status"]) == ["FAILED", "FINISHED"], runs[["tags.mlflow.runName", "status"]]
    assert agent["tags.resume"].iloc[1].startswith("resumed from")
    assert (runs[runs["tags.mlflow.runName"] != "train-agent/Breakout-0"]["status"] == "FINISHED").all()

    # the final artifacts equal the uninterrupted run's
    assert_same_run(repo / RUN, ref / RUN)
    assert (repo / "reports/atari100k_table.md").read_text() == (ref / "reports/atari100k_table.md").read_text()
