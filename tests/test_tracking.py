"""stages.tracking against a real MLflow SQLite store, a real git repo and real DVC hashing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from diamond.config import params_from_dict
from stages import run_tags, tracking, tracking_store
from conftest import ROOT, tiny_params_dict, write_params

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with MLflow's schema, made once: creating the schema takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{path}")
    MlflowClient().search_experiments()
    return path


@pytest.fixture
def store(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty store per test (MLFLOW_TRACKING_URI points at it)."""
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copyfile(empty_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(run_tags.PIPELINE_ID_ENV, raising=False)
    return uri


def git_repo(path: Path) -> str:
    """A real git repo with one commit; returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    (path / "README").write_text("x\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=path, check=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True,
                          text=True).stdout.strip()


def only_run(uri: str) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(uri)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_stage_run_tags_params_and_input_hashes(store: str, tmp_path: Path, monkeypatch) -> None:
    commit = git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    params = params_from_dict(tiny_params_dict())
    write_params(Path("params.yaml"), tiny_params_dict())
    (Path("data") / "sub").mkdir(parents=True)
    (Path("data") / "a.bin").write_bytes(b"abc")
    (Path("data") / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    Path("model.pt").write_bytes(b"weights")
    sections = {"env": params.env, "collect": params.collect}
    with tracking.stage_run("collect", sections, game="Breakout", seed=3,
                            inputs=[Path("data"), Path("model.pt")], params_file=Path("params.yaml")):
        mlflow.log_metric("steps", 5.0)
    run = only_run(store)
    t = run.data.tags
    assert run.info.run_name == "collect/Breakout-3" and run.info.status == "FINISHED"
    assert (t["stage"], t["game"], t["seed"], t["run"]) == ("collect", "Breakout", "3", "Breakout-3")
    assert t["git_commit"] == commit == t["mlflow.source.git.commit"]
    assert t["git_dirty"] == "false"  # params.yaml and data are untracked, not changes
    assert t["params_hash"] == run_tags.params_hash_of(sections)
    assert t["params_sections"] == "collect,env"
    assert t["pipeline_id"] == run_tags.pipeline_id(Path("params.yaml"))
    assert t["pipeline_id"].startswith(commit[:10])
    assert t["dvc_md5.data"] == run_tags.dvc_md5("data") and t["dvc_md5.data"].endswith(".dir")
    assert t["dvc_md5.model.pt"] == run_tags.file_md5(Path("model.pt"))
    assert run.data.params["env.frame_skip"] == str(params.env.frame_skip)
    assert run.data.params["collect.min_steps"] == str(params.collect.min_steps)
    assert run.data.metrics["steps"] == 5.0


def test_params_hash_changes_with_what_the_stage_reads(tiny_params) -> None:
    a = run_tags.params_hash_of({"env": tiny_params.env})
    d = tiny_params_dict()
    d["env"]["max_noops"] += 1
    assert run_tags.params_hash_of({"env": params_from_dict(d).env}) != a
    d = tiny_params_dict()
    d["collect"]["min_steps"] += 1  # a section the stage does not read
    assert run_tags.params_hash_of({"env": params_from_dict(d).env}) == a


def test_pipeline_id_shared_by_commit_and_params_overridden_by_env(tmp_path: Path, monkeypatch) -> None:
    git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(run_tags.PIPELINE_ID_ENV, raising=False)
    p = write_params(tmp_path / "params.yaml", tiny_params_dict())
    first = run_tags.pipeline_id(p)
    assert run_tags.pipeline_id(p) == first
    assert run_tags.pipeline_id(None) == first  # default: params.yaml in the working directory
    d = tiny_params_dict()
    d["evaluate"]["episodes"] = 7
    write_params(p, d)
    assert run_tags.pipeline_id(p) != first
    monkeypatch.setenv(run_tags.PIPELINE_ID_ENV, "sweep-42")
    assert run_tags.pipeline_id(p) == "sweep-42"


def test_git_dirty_ignores_dvc_lock_but_not_source_changes(tmp_path: Path, monkeypatch) -> None:
    git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text("a\n")
    subprocess.run(["git", "add", "dvc.lock"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], check=True)
    (tmp_path / "dvc.lock").write_text("b\n")  # what `dvc repro` does between stages
    assert not run_tags.git_dirty()
    (tmp_path / "README").write_text("edited\n")
    assert run_tags.git_dirty()


def test_params_file_is_read_from_the_stage_arguments() -> None:
    assert run_tags.params_file_from_argv(["x", "--game", "Pong", "--params", "cfg/p.yaml"]) == Path("cfg/p.yaml")
    assert run_tags.params_file_from_argv(["x", "--params=q.yaml"]) == Path("q.yaml")
    assert run_tags.params_file_from_argv(["x"]) == Path("params.yaml")


def test_dvc_md5_equals_what_dvc_records(tmp_path: Path) -> None:
    """Hash a directory and a file with the real `dvc add` and compare with ours."""
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "d" / "nested").mkdir(parents=True)
    (repo / "d" / "z.txt").write_text("line\r\nwindows line ends are not normalised by DVC 3\n")
    (repo / "d" / "nested" / "a.npy").write_bytes(bytes(range(256)) * 100)
    (repo / "d" / "empty").write_bytes(b"")
    (repo / "f.bin").write_bytes(b"\x01\x02")
    dvc = str(VENV_BIN / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "add", "-q", "d", "f.bin"], cwd=repo, check=True)
    for name in ("d", "f.bin"):
        recorded = yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert run_tags.dvc_md5(repo / name) == recorded, name


def test_stage_run_marks_a_failed_stage_failed(store: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with tracking.stage_run("aggregate", {"aggregate": params_from_dict(tiny_params_dict()).aggregate}):
            raise RuntimeError("boom")
    run = only_run(store)
    assert run.info.status == "FAILED" and "game" not in run.data.tags and run.info.run_name == "aggregate"


def test_default_store_is_local_sqlite_and_env_var_overrides(empty_store: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_store.tracking_uri() == "sqlite:///mlflow.db"
    other = tmp_path / "elsewhere" / "store.db"
    other.parent.mkdir()
    shutil.copyfile(empty_store, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with tracking.stage_run("collect", {"seeds": [0]}, game="Pong", seed=0):
        pass
    assert other.is_file() and not (tmp_path / "mlflow.db").exists()
    assert only_run(f"sqlite:///{other}").data.tags["game"] == "Pong"


WORKER = textwrap.dedent(
    """
    import sys
    import mlflow
    from stages.tracking import stage_run

    i, n = int(sys.argv[1]), int(sys.argv[2])
    with stage_run("collect", {"collect": {"i": i}}, game="Breakout", seed=i):
        for step in range(n):
            mlflow.log_metric("loss", float(step), step=step)
            mlflow.log_metrics({"a": 1.0, "b": float(i)}, step=step)
            mlflow.set_tag(f"t{step % 3}", str(step))
    """
)


def test_parallel_stages_on_a_fresh_sqlite_store_lose_nothing(tmp_path: Path, monkeypatch) -> None:
    """Several processes start at once on a new store (schema creation races) and log
    interleaved metrics; unguarded, most fail with "table ... already exists" or
    "database is locked"."""
    store = f"sqlite:///{tmp_path}/fresh/mlflow.db"  # not created yet: the workers race to create it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n_proc, n_steps = 3, 25
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(n_steps)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n_proc)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    mlflow.set_tracking_uri(store)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert sorted(int(r.data.tags["seed"]) for r in runs) == list(range(n_proc))
    for r in runs:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == list(range(n_steps))
        assert len(client.get_metric_history(r.info.run_id, "b")) == n_steps


def test_lock_file_is_gitignored() -> None:
    """The store lock lives beside mlflow.db and must not show up as an untracked file."""
    out = subprocess.run(["git", "check-ignore", "-q", "mlflow.db-lock"], cwd=ROOT)
    assert out.returncode == 0


def _collect(tmp_path: Path, uri: str) -> subprocess.CompletedProcess:
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    cmd = [sys.executable, "-m", "stages.collect", "--params", str(params), "--game", "Breakout", "--seed", "0",
           "--out-dataset", str(tmp_path / "out" / "dataset"), "--out-stats", str(tmp_path / "out" / "collect.json")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_unreachable_tracking_server_fails_the_stage_at_once_in_one_line(tmp_path: Path) -> None:
    done = _collect(tmp_path, "http://127.0.0.1:9")  # nothing listens on the discard port
    lines = [x for x in done.stderr.strip().splitlines() if not x.startswith(("A.L.E:", "[Powered by"))]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: MLFLOW_TRACKING_URI http://127.0.0.1:9: no MLflow server answers")
    assert not (tmp_path / "out").exists()  # no work done, nothing written


def test_a_lost_experiment_creation_race_still_names_the_experiment(tmp_path: Path) -> None:
    """Parallel first jobs on a new store: another process creates the experiment between this
    one's lookup and its creation. The id is still the experiment's (mlflow.set_experiment left
    no active experiment then, and the run went to experiment 0)."""
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    class LosesTheRace:
        """This process's view: its first lookup finds nothing, then the other process creates it."""

        def __init__(self) -> None:
            self.lookups = 0

        def get_experiment_by_name(self, name: str):
            self.lookups += 1
            if self.lookups == 1:
                store.create_experiment(name)  # the other process, just after this lookup
                return None
            return store.get_experiment_by_name(name)

        def create_experiment(self, name: str) -> str:
            return store.create_experiment(name)

    client = LosesTheRace()
    exp_id = tracking_store.experiment_id(client, "diamond-atari100k")
    assert exp_id == store.get_experiment_by_name("diamond-atari100k").experiment_id != "0"
    assert client.lookups == 2
