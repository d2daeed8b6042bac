"""The tiny pipeline through the real SLURM profile (`snakemake --profile profiles/slurm`) on a real
single-node SLURM cluster (tests/slurm_cluster.py): the train-agent job is killed by SLURM at its
time limit, the profile's `retries: 1` resubmits it, it resumes from runs/G-S/agent_state, and
every final artifact equals that of an uninterrupted local run of the same params.

The time limit that kills the first attempt is the one an operator sets on a running job
(`scontrol update JobId=N TimeLimit=0`). SLURM enforces time limits at a periodic check, every
30 s (slurmctld's PERIODIC_TIMEOUT, not configurable), and skips suspended jobs. So once the job
has saved its first epoch the test suspends it (`scontrol suspend`), cuts its limit, and resumes
it (`scontrol resume`) a second before the next check, which its debug2 log line dates: the job
runs about a second more and is killed. A job long enough to be sure of meeting a check it did
not know the time of would need 30 s after its first epoch on the fastest machine, and the
reference runs it whole too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from diamond.agent.loop import STATE_FILE
from pipeline_repo import assert_same_run, make_repo, mlflow_runs, pipeline_params, tool_env
from slurm_cluster import Cluster, why_unavailable

pytestmark = pytest.mark.slow

RUN = "runs/Breakout-0"
STATE = Path(RUN) / "agent_state" / STATE_FILE  # written after each epoch (checkpoint_every_epochs 1)
CHECK_PERIOD = 30.0  # slurmctld's periodic time-limit check (PERIODIC_TIMEOUT, src/slurmctld/controller.c)
RESUME_LEAD = 1.0  # seconds the job runs again before that check


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"), ctld_debug="debug2")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def slow_agent_params() -> dict:
    """The tiny pipeline, but a train-agent stage of ~12 epochs of ~1.5 s on one quiet CPU core,
    each checkpointed: the first attempt is suspended once epoch 1 is saved and runs about a second
    more before SLURM kills it, so it ends mid-run even on a machine several times as fast."""
    d = pipeline_params(seeds=[0])
    d["agent"].update(final_epochs_without_collection=9, denoiser_steps_per_epoch=20,
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


def job_state(cluster: Cluster, job: str) -> str:
    return cluster.run("squeue", "--noheader", "--states=all", f"--jobs={job}", "--format=%T").stdout.strip()


def scontrol(cluster: Cluster, *args: str) -> None:
    done = cluster.run("scontrol", *args)
    assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"


def next_time_limit_check(cluster: Cluster) -> float:
    """When slurmctld's next periodic time-limit check is due (epoch seconds): a period after the
    last one its log dates ("Testing job time limits", debug2, local time); waits for the first."""
    deadline = time.monotonic() + 2 * CHECK_PERIOD
    while True:
        logged = re.findall(r"^\[(\S+)\] debug2: Testing job time limits", cluster.ctld_log.read_text(), re.M)
        if logged:
            return datetime.fromisoformat(logged[-1]).timestamp() + CHECK_PERIOD
        if time.monotonic() > deadline:
            raise AssertionError(f"slurmctld logged no 'Testing job time limits' line in {2 * CHECK_PERIOD:.0f} s "
                                 f"(SlurmctldDebug=debug2):\n{cluster.logs()}")
        time.sleep(0.5)


def end_first_attempt_at_a_time_limit_check(cluster: Cluster, repo: Path, pipeline: subprocess.Popen,
                                            log_path: Path) -> str:
    """Once train-agent's first attempt has saved an epoch: suspend it, set its time limit to 0
    minutes as an operator would, and resume it RESUME_LEAD before slurmctld's next time-limit
    check, which kills it for TIMEOUT. Should a check come late and the job still run, it is
    suspended again for the next one. Returns the job id."""
    while (job := running_train_agent_job(cluster)) is None or not (repo / STATE).exists():
        if pipeline.poll() is not None:
            raise AssertionError(f"the pipeline ended before train-agent saved an epoch:\n{log_path.read_text()[-6000:]}")
        time.sleep(0.5)
    scontrol(cluster, "suspend", job)
    scontrol(cluster, "update", f"JobId={job}", "TimeLimit=0")
    for _ in range(3):
        while (due := next_time_limit_check(cluster)) - RESUME_LEAD < time.time():
            time.sleep(0.2)  # too close: the one after
        time.sleep(max(0.0, due - RESUME_LEAD - time.time()))
        scontrol(cluster, "resume", job)
        while (state := job_state(cluster, job)) == "RUNNING" and time.time() < due + 5:
            time.sleep(0.2)
        if state != "RUNNING":
            return job
        scontrol(cluster, "suspend", job)
    raise AssertionError(f"SLURM did not end job {job} at three time-limit checks:\n{cluster.logs()}")


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
        cut = end_first_attempt_at_a_time_limit_check(cluster, repo, pipeline, log_path)
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
    assert f"Time limit exhausted for JobId={killed[0]}" in cluster.ctld_log.read_text()
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
