"""stages.mlflow_sync on a journal whose server was lost before the run existed: the upload
creates the run (name, tags, start time), logs everything, and a second upload finds that run
again and duplicates nothing (real local MLflow store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from stages import mlflow_sync, tracking, tracking_store


def test_upload_creates_the_lost_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stats.json").write_text("{}")
    start = {"op": "start", "journal_id": "0123abcd4567", "tracking_uri": "http://gone:5000", "experiment": "exp",
             "run_name": "collect/Breakout-0", "tags": {"stage": "collect"}, "start_time": 1_000, "run_id": None}
    journal = tracking._Tracker("http://gone:5000", tmp_path, "collect", start)
    journal.go_offline(ConnectionError("refused"))
    for record in (
        {"op": "params", "params": {"collect.min_steps": "200"}},
        {"op": "metrics", "metrics": {"collected_steps": 100.0}, "step": 100, "timestamp": 2_000},
        {"op": "metrics", "metrics": {"collected_steps": 200.0}, "step": 200, "timestamp": 3_000},
        {"op": "artifact", "path": str(tmp_path / "stats.json"), "artifact_path": None},
        {"op": "end", "status": "FINISHED", "end_time": 4_000},
    ):
        journal.append(record)
    path = journal.journal
    assert path == tmp_path / ".mlflow_pending" / "collect-0123abcd4567.jsonl"
    tracking_store.create_sqlite_store(uri)

    def only_run():
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "collected_steps")]
        return run, history, [a.path for a in client.list_artifacts(run.info.run_id)]

    mlflow_sync.main([str(tmp_path)])
    run, history, artifacts = only_run()
    assert run.info.run_name == "collect/Breakout-0" and run.info.status == "FINISHED"
    assert (run.info.start_time, run.info.end_time) == (1_000, 4_000)
    assert run.data.tags["stage"] == "collect" and run.data.tags[tracking.JOURNAL_TAG] == "0123abcd4567"
    assert run.data.params == {"collect.min_steps": "200"}
    assert sorted(history) == [(100, 100.0), (200, 200.0)] and artifacts == ["stats.json"]
    uploaded = path.with_name(path.name + ".uploaded")
    assert not path.exists() and uploaded.exists()
    mlflow_sync.main([str(uploaded)])  # again: the same run, nothing doubled
    again = only_run()
    assert again[0].info.run_id == run.info.run_id and sorted(again[1]) == sorted(history) and again[2] == artifacts
