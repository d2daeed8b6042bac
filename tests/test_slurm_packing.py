"""K jobs on one GPU under SLURM: on a real one-node cluster (tests/slurm_cluster.py) whose GPU is
split into K = 2 shards (`GresTypes=gpu,shard`, gres.conf `Name=shard Count=2`; SLURM's GPU
sharding, https://slurm.schedmd.com/gres.html#Sharding), three jobs that each ask for one shard as
the Snakefile's GPU rules do with params `runs_per_gpu: 2` (`gres=shard:1`, which the executor
plugin submits as `--gres=shard:1`): two run at once, the third waits for a shard (reason
Resources) while CPUs are free, and starts when one of the two ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import Cluster, why_unavailable

pytestmark = pytest.mark.slow

SHARDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    # CPUs for all three jobs and more, so that only the shards can hold the third back
    c = Cluster(tmp_path_factory.mktemp("slurm_shards"), cpus=2 * (SHARDS + 1), shards=SHARDS)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def queue(c: Cluster) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason) of the jobs not yet ended."""
    out = c.run("squeue", "--noheader", "--format=%i %T %r").stdout
    return {i: (state, reason) for i, state, reason in (line.split() for line in out.splitlines())}


def wait_for(c: Cluster, done, what: str, timeout: float = 60) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = queue(c)
        if done(q):
            return q
        time.sleep(0.5)
    raise AssertionError(f"{what}: squeue says {queue(c)}\n{c.logs()}")


def node_field(c: Cluster, name: str) -> str:
    out = c.run("scontrol", "show", "node", c.node).stdout
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith(f"{name}="))


def test_k_shards_run_k_jobs_at_once_and_the_next_waits(cluster: Cluster, tmp_path: Path) -> None:
    start = time.monotonic()
    submit = ["sbatch", "--parsable", "--gres=shard:1", "--ntasks=1", "--cpus-per-task=1", "--mem=100",
              f"--output={tmp_path}/%j.out", "--wrap", "sleep 300"]
    jobs = [cluster.run(*submit).stdout.strip() for _ in range(SHARDS + 1)]
    assert all(j.isdigit() for j in jobs), jobs

    first, waiting = jobs[:SHARDS], jobs[SHARDS]
    q = wait_for(cluster, lambda q: all(q.get(j, ("",))[0] == "RUNNING" for j in first)
                 and q.get(waiting, ("", ""))[1] == "Resources", f"{SHARDS} running, the next pending on Resources")
    assert q[waiting][0] == "PENDING"
    # each running job holds a shard of the one GPU; the node's CPUs are not all taken (and
    # memory is no consumable resource under CR_CPU): the shards hold the third job back
    for j in first:
        assert "GRES=shard:1(IDX:0)" in cluster.run("scontrol", "-d", "show", "job", j).stdout, j
    assert int(node_field(cluster, "CPUAlloc")) == SHARDS < int(node_field(cluster, "CPUTot"))

    cluster.run("scancel", first[0])
    wait_for(cluster, lambda q: q.get(waiting, ("",))[0] == "RUNNING", "the waiting job starts on the freed shard")
    print(f"packing test: {time.monotonic() - start:.1f} s after the cluster started")
