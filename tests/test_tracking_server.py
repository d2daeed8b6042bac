"""A real `mlflow server` (SQLite backend, local artifact store) on localhost, as cluster users
point MLFLOW_TRACKING_URI at one: parallel stage jobs lose no run, param, metric or artifact."""

from __future__ import annotations

import json
import os
import shutil
import signal
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

# MLflow 3's server also starts job runners (huey consumers, for its GenAI jobs): the pipeline
# submits no job, and each runner costs seconds of CPU, so the tests' servers run without them.
WITHOUT_SERVER_JOBS = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on localhost with its SQLite store and artifacts under `root`, in its own
    process group (its workers are child processes); returns once it answers /health."""
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), start_new_session=True,
        env=WITHOUT_SERVER_JOBS,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_server(proc)
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


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


def _run_summary(client: MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)
    metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}
    # the input's tag names its path (a/dataset, b/dataset); the md5 is the same
    tags = {k.split(".")[0] if k.startswith("dvc_md5.") else k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {"status": run.info.status, "params": run.data.params, "metrics": metrics,
            "artifacts": sorted(a.path for a in client.list_artifacts(run_id)), "tags": tags}


@pytest.mark.slow
def test_a_server_lost_mid_run_loses_nothing_once_the_journal_is_uploaded(tmp_path: Path) -> None:
    """SIGKILL the server while train-world-model logs its curve: the stage finishes (exit 0, its
    artifacts written), keeps the rest in its journal; the restarted server (same store) then gets
    it from `python -m stages.mlflow_sync`, and the run equals an uninterrupted one; twice is once."""
    d = tiny_params_dict()
    d["world_model"].update(denoiser_steps=40, reward_end_steps=40, log_every_steps=4, checkpoint_every_steps=20)
    params = write_params(tmp_path / "params.yaml", d)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)

    def stage(module: str, run: Path, **paths: str) -> list[str]:
        args = [sys.executable, "-m", module, "--params", str(params), "--game", "Breakout", "--seed", "0"]
        for k, v in paths.items():
            args += [f"--{k.replace('_', '-')}", str(run / v)]
        return args

    def train(run: Path) -> list[str]:
        return stage("stages.train_world_model", run, dataset="dataset", out_checkpoint="world_model.pt",
                     out_metrics="world_model.json", out_curve="curve.csv", out_media="media")

    server = start_server(tmp_path, port)
    try:
        done = subprocess.run(stage("stages.collect", tmp_path / "a", out_dataset="dataset", out_stats="collect.json"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        done = subprocess.run(train(tmp_path / "a"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        (reference,) = client.search_runs([exp], "tags.stage = 'train-world-model'")

        job = subprocess.Popen(train(tmp_path / "b"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:  # kill the server once the new run has logged part of its curve
            runs = client.search_runs([exp], f"tags.stage = 'train-world-model' and attributes.run_id != '{reference.info.run_id}'")
            if runs and "denoiser_loss" in runs[0].data.metrics:
                break
            assert job.poll() is None and time.time() < deadline, "the stage ended before the server was killed"
            time.sleep(0.2)
        run_id = runs[0].info.run_id
        stop_server(server, signal.SIGKILL)
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        assert sum("warning: MLflow server" in line for line in err.splitlines()) == 1, err[-3000:]
        for name in ("world_model.pt", "world_model.json", "curve.csv", "media"):
            assert (tmp_path / "b" / name).exists(), name
        (journal,) = (tmp_path / "b" / ".mlflow_pending").glob("train-world-model-*.jsonl")
        ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
        assert ops[0] == "start" and "metrics" in ops and "artifact" in ops and ops[-1] == "end", ops

        server = start_server(tmp_path, port)
        assert _run_summary(client, run_id)["status"] == "RUNNING"  # the server never heard the end
        sync = [sys.executable, "-m", "stages.mlflow_sync"]
        done = subprocess.run(sync + [str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and f"run {run_id}" in done.stdout, done.stderr[-3000:]
        assert not journal.exists() and journal.with_name(journal.name + ".uploaded").exists()
        want, got = _run_summary(client, reference.info.run_id), _run_summary(client, run_id)
        assert got == want
        assert got["status"] == "FINISHED" and "world_model.pt" in got["artifacts"]
        assert len(got["metrics"]["denoiser_loss"]) == 10  # 40 steps, logged every 4
        # A second upload of the same journal duplicates nothing.
        done = subprocess.run(sync + [str(journal.with_name(journal.name + ".uploaded"))], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _run_summary(client, run_id) == want
    finally:
        stop_server(server)
