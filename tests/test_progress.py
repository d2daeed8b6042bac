"""diamond.progress: a tqdm bar on a terminal, plain periodic lines in a log file."""

from __future__ import annotations

import io
import time

import pytest

from diamond.progress import Progress, interval_seconds


def test_plain_lines_in_a_log_file_count_rate_and_eta(monkeypatch):
    monkeypatch.setenv("DIAMOND_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    with Progress("train-agent Pong-1", 4, "epochs", initial=1, stream=log) as bar:
        for _ in range(3):
            bar.update()
    lines = log.getvalue().splitlines()
    # 2/4 and 3/4; none at completion (the stage's own summary line follows)
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == ["2/4 epochs", "3/4 epochs"]
    assert lines[0].startswith("train-agent Pong-1: 2/4 epochs (50.0%), ") and "epochs/s, ETA " in lines[0]


def test_no_line_before_the_interval(monkeypatch):
    monkeypatch.delenv("DIAMOND_PROGRESS_SECONDS", raising=False)
    assert interval_seconds() == 60.0
    log = io.StringIO()
    bar = Progress("study", 100, stream=log)
    for _ in range(50):
        bar.update()
    assert log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = io.StringIO()
    with Progress("train-world-model Breakout-0", 5, stream=term, tty=True) as bar:
        bar.update()
        time.sleep(0.2)  # past tqdm's minimum refresh interval (0.1 s)
        bar.update(2)
    assert "train-world-model Breakout-0" in term.getvalue() and "3/5" in term.getvalue()


@pytest.mark.parametrize("raw", ["soon", "-1"])
def test_a_bad_interval_is_a_one_line_error(monkeypatch, raw):
    monkeypatch.setenv("DIAMOND_PROGRESS_SECONDS", raw)
    with pytest.raises(ValueError, match=f"DIAMOND_PROGRESS_SECONDS={raw!r}: expected a number of seconds >= 0"):
        interval_seconds()
