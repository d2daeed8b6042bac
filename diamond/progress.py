"""Progress of the long loops (train-world-model's optimiser steps, train-agent's epochs and
actor-critic steps, the study's denoiser steps), which at the paper's scale run for hours.

On a terminal: a tqdm bar with rate and ETA. When stderr is a file (Snakemake and SLURM logs, DVC
run by a scheduler): one plain line every `DIAMOND_PROGRESS_SECONDS` seconds (default 60; 0 prints
every update), e.g. `train-world-model Breakout-0: 1200/20000 steps (6.0%), 3.1 steps/s, ETA 1:30:19`.
An update costs one clock read (well under a microsecond against steps of milliseconds to seconds),
and nothing here touches the random streams, so results do not depend on it.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import IO, Any

from tqdm import tqdm

DEFAULT_INTERVAL_SECONDS = 60.0
INTERVAL_ENV = "DIAMOND_PROGRESS_SECONDS"


def interval_seconds() -> float:
    """Seconds between plain progress lines: DIAMOND_PROGRESS_SECONDS, or 60."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return DEFAULT_INTERVAL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress:
    """Counts `total` units of work from `initial` (a resumed run starts where it stopped)."""

    def __init__(self, desc: str, total: int, unit: str = "steps", initial: int = 0,
                 stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self.stream = sys.stderr if stream is None else stream
        is_tty = self.stream.isatty() if tty is None else tty
        self.bar: Any = None
        if is_tty:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s") or unit,
                            file=self.stream, leave=False, dynamic_ncols=True)
        self.interval = interval_seconds()
        self.start = self.last = time.monotonic()
        self.start_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        done = self.n - self.start_n
        rate = done / (now - self.start) if now > self.start else 0.0
        eta = _eta((self.total - self.n) / rate) if rate > 0 else "?"
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.1f}%), {rate:.3g} {self.unit}/s, ETA {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
