"""Writers SIGKILLed mid-write leave nothing broken or stale behind (found by scripts/fault_campaign.py):
a temporary directory of a killed atomic write is removed by the next writer, and a local MLflow
store killed during its creation (schema migrations) is absent, not half-migrated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from conftest import ROOT
from diamond.io import atomic_directory, atomic_write_bytes


def _killed_when(code: str, ready: "callable[[], bool]", delay: float = 0.0) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before the kill point"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_killed_directory_write_is_cleaned_by_the_next(tmp_path: Path) -> None:
    dst = tmp_path / "dataset"
    atomic_directory_code = (
        "import time; from diamond.io import atomic_directory\n"
        f"with atomic_directory({str(dst)!r}) as t:\n"
        "    (t / 'a').write_bytes(b'x'); time.sleep(60)\n"
    )
    _killed_when(atomic_directory_code, lambda: any((p / "a").exists() for p in tmp_path.glob(".dataset.*.tmp")))
    (tmp_path / ".stats.json.k1ll3d_x.tmp").write_bytes(b"half")  # as a writer killed in atomic_write_bytes leaves it
    assert len(list(tmp_path.glob(".*.tmp"))) == 2
    with atomic_directory(dst) as t:
        (t / "b").write_bytes(b"y")
    atomic_write_bytes(tmp_path / "stats.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "stats.json"]
    assert [p.name for p in dst.iterdir()] == ["b"]
    with atomic_directory(dst) as t:  # replacing a complete directory
        (t / "c").write_bytes(b"z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "stats.json"]
    assert [p.name for p in dst.iterdir()] == ["c"]


def test_a_store_killed_during_its_creation_is_not_left_half_migrated(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = f"from stages.tracking_store import create_sqlite_store, store_lock\nwith store_lock({uri!r}): create_sqlite_store({uri!r})"
    # killed 1 s into the migrations (they take several seconds)
    _killed_when(code, lambda: db.exists() or any(tmp_path.glob("mlflow.db-init-*")), delay=1.0)
    from stages.tracking_store import create_sqlite_store

    create_sqlite_store(uri)  # as the next stage does (under the store lock)
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]
    assert not list(tmp_path.glob("mlflow.db-init-*"))  # a killed creator's file is removed
