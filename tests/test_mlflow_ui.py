"""The MLflow UI shows the pipeline's runs: a real `mlflow ui` on a loopback port over a SQLite
store holding real stage runs, opened by headless Chromium (Debian's `chromium` package).

The screenshot is kept in $TEST_ARTIFACTS_DIR (default .pytest_cache/artifacts, gitignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT
from stages import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; bash scripts/setup.sh --test)"
)
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / ".pytest_cache" / "artifacts"))
RUNS = [("Breakout", 0), ("Pong", 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{tmp}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        for game, seed in RUNS:  # real stage runs, as the pipeline makes them
            with tracking.stage_run("evaluate", {"seeds": [seed]}, game=game, seed=seed):
                mlflow.log_metric("mean_return", 10.0 + seed)
        experiment_id = mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    port = free_port()
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as tests/test_tracking_server.py
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        yield {"url": f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs", "tmp": tmp}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,900",
           "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_experiment_page_lists_the_runs_by_name(ui: dict) -> None:
    dom = chromium(ui["tmp"], "--dump-dom", ui["url"]).stdout
    assert "<title>" in dom, "chromium rendered nothing"
    for game, seed in RUNS:
        assert f"evaluate/{game}-{seed}" in dom, f"run evaluate/{game}-{seed} not on the page"
    assert "Runs - Experiment" in dom  # the runs table, not the GenAI overview


def test_screenshot_is_kept(ui: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow_ui_runs.png"
    shot.unlink(missing_ok=True)
    chromium(ui["tmp"], f"--screenshot={shot}", ui["url"])
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
