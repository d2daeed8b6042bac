"""Upload what a stage kept while its MLflow server was away (stages/tracking.py, "journal").

    python -m stages.mlflow_sync runs/Breakout-0/.mlflow_pending/train-agent-0123abcd4567.jsonl
    python -m stages.mlflow_sync runs reports          # every journal found under these directories

Run with MLFLOW_TRACKING_URI set as for the stages (default: the journal's own server). Each
journal is replayed into its run: the run the stage created (same run id), or, if the server was
lost before that, a run created now with the stage's name, tags and start time and tagged
`diamond.journal_id` (a second upload finds it by that tag). Params, metrics (with their steps
and timestamps), tags and artifacts (read from where the stage wrote them) are logged, then the
run's end status and time. Replaying is idempotent: MLflow accepts a param logged again with
the same value, keeps one copy of a metric value logged again with the same key, step and
timestamp, and overwrites tags and artifacts. A journal that went through is renamed to
`*.jsonl.uploaded` (kept: upload it again to check, nothing doubles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from stages.tracking import JOURNAL_TAG, PENDING_DIR

from stages.tracking_store import experiment_id, retry_locked

BATCH = 500  # MLflow's log_batch accepts up to 1000 metrics, 100 params, 100 tags per call


def read_journal(path: Path) -> list[dict[str, Any]]:
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last line of a stage killed mid-write
                break
            raise SystemExit(f"error: {path}:{n}: not a journal line") from None
    if not records or records[0].get("op") != "start":
        raise SystemExit(f"error: {path}: not an MLflow journal (no start record)")
    return records


def find_journals(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        if p.is_dir():
            found += sorted(p.rglob(f"{PENDING_DIR}/*.jsonl"))
        elif p.is_file():
            found.append(p)
        else:
            raise SystemExit(f"error: {p}: no such journal or directory")
    return found


def _run_id(client: MlflowClient, start: dict[str, Any]) -> str:
    if start.get("run_id"):
        return start["run_id"]
    exp_id = experiment_id(client, start["experiment"])
    found = client.search_runs([exp_id], filter_string=f"tags.`{JOURNAL_TAG}` = '{start['journal_id']}'")
    if found:
        return found[0].info.run_id
    tags = {**start["tags"], JOURNAL_TAG: start["journal_id"]}
    return client.create_run(exp_id, start_time=start["start_time"], tags=tags, run_name=start["run_name"]).info.run_id


def upload(path: Path, client: MlflowClient) -> str:
    records = read_journal(path)
    run_id = _run_id(client, records[0])
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics: list[Metric] = []
    artifacts: list[dict[str, Any]] = []
    end = None
    for r in records[1:]:
        op = r.get("op")
        if op == "params":
            params.update(r["params"])
        elif op == "tags":
            tags.update(r["tags"])
        elif op == "metrics":
            metrics += [Metric(k, v, r["timestamp"], r["step"] or 0) for k, v in r["metrics"].items()]
        elif op in ("artifact", "artifacts"):
            artifacts.append(r)
        elif op == "end":
            end = r
    plist = [Param(k, v) for k, v in params.items()]
    tlist = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(plist), 100):
        retry_locked(client.log_batch, run_id, params=plist[i:i + 100])
    for i in range(0, len(tlist), 100):
        retry_locked(client.log_batch, run_id, tags=tlist[i:i + 100])
    for i in range(0, len(metrics), BATCH):
        retry_locked(client.log_batch, run_id, metrics=metrics[i:i + BATCH])
    for a in artifacts:
        if not Path(a["path"]).exists():
            raise SystemExit(f"error: {path}: artifact {a['path']} is gone; nothing else to upload after it")
        log = client.log_artifact if a["op"] == "artifact" else client.log_artifacts
        log(run_id, a["path"], a["artifact_path"])
    if end is not None:
        retry_locked(client.set_terminated, run_id, end["status"], end["end_time"])
    return (f"{path}: run {run_id} ({records[0]['run_name']}): {len(plist)} params, {len(metrics)} metric values, "
            f"{len(tlist)} tags, {len(artifacts)} artifacts" + (f", ended {end['status']}" if end else ", not ended"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="journals, or directories to search for .mlflow_pending/*.jsonl")
    args = p.parse_args(argv)
    journals = find_journals(args.paths)
    if not journals:
        print("nothing to upload")
    for path in journals:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or read_journal(path)[0]["tracking_uri"]
        print(upload(path, MlflowClient(tracking_uri=uri)), flush=True)
        if path.suffix == ".jsonl":
            path.rename(path.with_name(path.name + ".uploaded"))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
