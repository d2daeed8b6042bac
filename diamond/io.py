"""Atomic artifact writes and checked loads.

Artifacts are written to a temporary name in the same directory, flushed to disk, then renamed,
so a killed process never leaves a half-written file under the final name and never destroys
the previous complete version.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ArtifactError(ValueError):
    """A missing, truncated or corrupt artifact; the message names the file."""


def remove_stale_temporaries(path: Path) -> None:
    """Remove what a killed writer of `path` left: its temporary names `.NAME.XXXXXXXX.tmp`
    (tempfile's 8 random characters). One writer per artifact path, so none is live."""
    stale = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the artifact the ordinary umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(dst: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name beside `dst`; it replaces `dst` only once complete.

    If the body raises, the temporary directory is removed and an existing `dst` is untouched;
    a killed writer's temporary directory is removed by the next writer of `dst`. The old `dst`
    is renamed aside before the new one takes its name, so a kill never leaves it half deleted.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
            os.replace(dst, old)  # onto the empty directory: rename(2) replaces it
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_torch(path: str | Path, obj: Any) -> None:
    import torch  # here, not at the top: the stages that write no checkpoint (aggregate) start ~1 s sooner

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path, map_location: str | torch.device = "cpu", weights_only: bool = False) -> Any:
    """Load a checkpoint, turning any truncation or corruption into one clear error.

    `weights_only` for files from elsewhere (e.g. downloaded official weights): tensors and plain
    containers only, no arbitrary unpickling."""
    import torch  # as in atomic_save_torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: corrupt or truncated checkpoint ({first})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
