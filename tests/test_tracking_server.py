"""A real `mlflow server` (SQLite backend, local artifact store) on localhost, as cluster users
point MLFLOW_TRACKING_URI at one: parallel stage jobs lose no run, param, metric or artifact."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, tiny_params_dict, write_params
from stages.tracking import EXPERIMENT

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_four_parallel_stage_jobs_lose_nothing_on_a_real_server(server: str, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "stages.collect", "--params", str(params), "--game", "Breakout", "--seed", str(seed),
             "--out-dataset", str(tmp_path / f"run{seed}" / "dataset"), "--out-stats", str(tmp_path / f"run{seed}" / "collect.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(4)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"collect/Breakout-{s}" for s in range(4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["collect.min_steps"] == "200" and run.data.tags["stage"] == "collect"
        assert {"collected_steps", "minority_rewards", "env_steps_per_second"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "collected_steps")) >= 2  # every chunk kept
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["collect.json"]
