"""The authors' released DIAMOND agents: where a game's checkpoint file comes from.

The authors released, per Atari 100k game, the agent behind the paper's results: an official
`Agent` state dict (world model and actor-critic) in the Hugging Face Hub repository
`eloialonso/diamond`, file `atari_100k/models/{Game}.pt` (official src/play.py, `download`).
`locate_released` finds it in this order, so that a machine without internet works from a
folder of files and nothing is downloaded twice:

1. `released.dir/{Game}.pt`, a local folder (e.g. files copied from another machine);
2. the Hugging Face cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub);
3. a download with `huggingface_hub.hf_hub_download` into that cache (`HF_ENDPOINT` selects a
   mirror; `HF_HUB_OFFLINE=1` forbids the network).

Whatever the source, the file's sha256 is part of the answer, so that every score traces back
to the exact bytes it came from. The format is converted by `diamond.official.keymap`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from diamond.config import ConfigError, ReleasedConfig


class ReleasedNotFound(ConfigError):
    """The released checkpoint of a game is neither local nor downloadable; the message says where to put it."""


@dataclass(frozen=True)
class ReleasedFile:
    path: Path
    source: str  # "dir", "hf-cache" or "download"
    sha256: str
    repo_filename: str  # the file's path in the Hub repository

    @property
    def commit(self) -> str:
        """The Hub commit the revision resolved to (the cache's snapshots/<commit>/ folder), if known."""
        parts = self.path.parts
        return parts[parts.index("snapshots") + 1] if self.source != "dir" and "snapshots" in parts[:-1] else ""

    def record(self, cfg: ReleasedConfig) -> dict[str, str]:
        """Provenance for checkpoints, score files and MLflow tags."""
        return {"path": str(self.path), "source": self.source, "sha256": self.sha256, "repo_id": cfg.repo_id,
                "revision": cfg.revision, "commit": self.commit, "filename": self.repo_filename}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def repo_filename(cfg: ReleasedConfig, game: str) -> str:
    return cfg.filename.format(game=game)


def local_path(cfg: ReleasedConfig, game: str) -> Path:
    return Path(cfg.dir) / f"{game}.pt"


def locate_released(cfg: ReleasedConfig, game: str, allow_download: bool = True) -> ReleasedFile:
    """The released checkpoint of `game`: local folder, else Hugging Face cache, else download."""
    filename = repo_filename(cfg, game)
    local = local_path(cfg, game)
    if local.is_file():
        return ReleasedFile(local, "dir", sha256_file(local), filename)
    # Imported here: huggingface_hub reads HF_* variables at import; only this path needs it.
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.repo_id, filename, revision=cfg.revision)
    if isinstance(cached, str):
        return ReleasedFile(Path(cached), "hf-cache", sha256_file(Path(cached)), filename)
    if not allow_download:
        raise ReleasedNotFound(_missing(cfg, game, filename, "downloads are off"))
    try:
        path = Path(hf_hub_download(cfg.repo_id, filename, revision=cfg.revision))
    except Exception as e:  # offline, unknown file, HTTP error: all mean "put the file there"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReleasedNotFound(_missing(cfg, game, filename, f"download failed: {type(e).__name__}: {reason}")) from None
    return ReleasedFile(path, "download", sha256_file(path), filename)


def _missing(cfg: ReleasedConfig, game: str, filename: str, why: str) -> str:
    return (f"released checkpoint of {game} not found: no {local_path(cfg, game)}, not in the Hugging Face cache, "
            f"and {why}; put {Path(filename).name} (https://huggingface.co/{cfg.repo_id}/blob/{cfg.revision}/{filename}) "
            f"in {cfg.dir}/")
