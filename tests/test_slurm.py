"""The tiny pipeline through the real SLURM profile (`snakemake --profile profiles/slurm`) on a real
single-node SLURM cluster (tests/slurm_cluster.py): the train-agent job is killed by SLURM at its
time limit, the profile's `retries: 1` resubmits it, it resumes from runs/G-S/agent_state, and
every final artifact equals that of an uninterrupted local run of the same params.

The time limit that kills the first attempt is the one an operator sets on a running job
(`scontrol update JobId=N TimeLimit=0`), set as soon as the job has saved its first epoch: SLURM
enforces it at its next periodic check (every 30 s), as it would a 1-minute limit given at
submission, which can only end a job 60-90 s in and so needed a train-agent of minutes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diamond.agent.loop import STATE_FILE
from pipeline_repo import assert_same_run, make_repo, mlflow_runs, pipeline_params, tool_env
from slurm_cluster import Cluster, why_unavailable

pytestmark = pytest.mark.slow

RUN = "runs/Breakout-0"
STATE = Path(RUN) / "agent_state" / STATE_FILE  # written after each epoch (checkpoint_every_epochs 1)


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
    """The tiny pipeline, but a train-agent stage of ~45 epochs of ~1.5 s on one quiet CPU core
    (~68 s), each checkpointed: the first attempt's limit is cut once epoch 1 is saved, and
    SLURM's next check (at most 30 s later) comes before the last epoch even on a machine twice
    as fast. The reference and the SLURM job each run it whole: it is most of this test's CPU."""
    d = pipeline_params(seeds=[0])
    d["agent"].update(final_epochs_without_collection=42, denoiser_steps_per_epoch=20,
                      reward_end_steps_per_epoch=10, actor_critic_steps_per_epoch=20, checkpoint_every_epochs=1)
    return d


def slurm_command() -> list[str]:
    """The repository's SLURM profile as a user runs it; only what this one-node test cluster
    needs differs: memory requests within its RAM, no accounting database (status from squeue),
    quicker status polling."""
    small_memory = [f"{rule}:mem_mb=1000" for rule in ("collect", "train_world_model", "train_agent", "evaluate",
                                                        "aggregate")]
    return ["snakemake", "--profile", "profiles/slurm",
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
            "--set-resources", *small_memory]


def running_train_agent_job(cluster: Cluster) -> str | None:
    """The id of the running train-agent job (the plugin's job comment names the rule), if any."""
    out = cluster.run("squeue", "--noheader", "--states=RUNNING", "--format=%i %k").stdout
    ids = [line.split()[0] for line in out.splitlines() if " rule_train_agent" in line]
    return ids[0] if ids else None


def end_first_attempt_at_its_first_epoch(cluster: Cluster, repo: Path, pipeline: subprocess.Popen,
                                         log_path: Path) -> str:
    """Once train-agent's first attempt has saved an epoch, set its time limit to 0 minutes, as an
    operator would (`scontrol update`): slurmctld then kills it for TIMEOUT at its next time-limit
    check. Returns the job id."""
    while pipeline.poll() is None:
        job = running_train_agent_job(cluster)
        if job is not None and (repo / STATE).exists():
            done = cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=0")
            assert done.returncode == 0, done.stderr
            return job
        time.sleep(0.5)
    raise AssertionError(f"the pipeline ended before train-agent saved an epoch:\n{log_path.read_text()[-6000:]}")


def test_time_limit_kill_is_retried_and_resumes_to_the_uninterrupted_result(cluster: Cluster, tmp_path: Path) -> None:
    params = slow_agent_params()
    repo, ref = make_repo(tmp_path / "slurm", params), make_repo(tmp_path / "local", params)
    # the uninterrupted reference runs locally meanwhile (beside the SLURM job)
    reference = subprocess.Popen(["snakemake", "-j", "1"], cwd=ref, env=tool_env(tmp_path / "local.db"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    start = time.monotonic()
    log_path = tmp_path / "snakemake-slurm.log"  # a file, not a pipe: nothing reads it while the test watches
    with log_path.open("w") as log_file:
        pipeline = subprocess.Popen(slurm_command(), cwd=repo, env={**tool_env(tmp_path / "slurm.db"), **cluster.env},
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cut = end_first_attempt_at_its_first_epoch(cluster, repo, pipeline, log_path)
        pipeline.wait(timeout=2400)
        out = log_path.read_text()
        assert pipeline.returncode == 0, out[-4000:]
    except BaseException as e:
        for p in (pipeline, reference):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        raise AssertionError(f"{e}\n{cluster.logs()}") from None
    ref_out, _ = reference.communicate(timeout=2400)
    print(f"SLURM pipeline: {time.monotonic() - start:.0f} s")
    assert reference.returncode == 0, ref_out[-4000:]

    # the first train-agent job was killed by SLURM's time limit, the retry resumed and finished
    killed = re.findall(r"SLURM-job '(\d+)' failed, SLURM status is: 'TIMEOUT'", out)
    assert killed == [cut], out[-6000:]
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
