"""Directory-backed episode store (docs/architecture.md §3.1).

Layout of a store directory:
    manifest.json           game, num_actions, and per episode: file name, steps, size, sha256
    episode_000000.npz ...  one compressed npz per episode (readable with numpy.load)
    episode_000007.partial_000450.npz
                            the episode still in progress, stored at 450 steps (only while
                            training collects: official src/coroutines/collector.py writes the
                            current episode into the dataset at every collection call and
                            replaces it as it grows); it takes its plain name once it ends

The episode files are written byte-for-byte reproducibly (fixed zip timestamps and attributes),
so the same data give the same files and the same DVC hashes. Every write goes to a temporary
file that is renamed into place, the episode before the manifest that lists it, so a killed
process leaves the previous complete store. Replacing an episode writes it under a new name (its
step count is in the name), then the manifest, then removes the old file, so the listed file is
never overwritten. Opening a store checks every listed file against its size and sha256, so a
truncated or corrupted file is an `ArtifactError` naming that file.

An episode's manifest entry may also list `writes`: the step counts at which it was written
(`world_model.training_frames: resaved_per_write`, diamond/data/resave.py). Stores without it,
and episodes stored once, read as written once at their full length.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np

from diamond.data.episode import Episode
from diamond.io import ArtifactError, atomic_directory, atomic_write_bytes, atomic_write_json, read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Zip entries carry a timestamp; a fixed one (the zip epoch) keeps files byte-identical.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def encode_episode(ep: Episode) -> bytes:
    """The episode as deterministic npz bytes (deflate-compressed .npy members)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, array in ep.arrays().items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=6)
    return buf.getvalue()


def decode_episode(data: bytes, path: Path) -> Episode:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            arrays = {name: np.lib.format.read_array(io.BytesIO(zf.read(f"{name}.npy")), allow_pickle=False)
                      for name in Episode.FIELDS}
        ep = Episode(**arrays)
        ep.check()
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: corrupt episode file ({e})") from None
    return ep


def _valid_writes(writes: object, num_steps: int) -> bool:
    return (isinstance(writes, list) and len(writes) > 0 and all(isinstance(w, int) and w >= 1 for w in writes)
            and all(a < b for a, b in zip(writes, writes[1:])) and writes[-1] == num_steps)


class EpisodeStore:
    """Episodes of one game, in a directory; created if missing, verified if present."""

    def __init__(self, root: str | Path, game: str | None = None, num_actions: int | None = None) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        self._cache: dict[int, Episode] = {}
        self._pending: dict[int, bytes] = {}  # verified file bytes not decoded yet
        self._lengths = np.zeros(0, dtype=np.int64)
        if manifest_path.exists():
            self._open(manifest_path, game, num_actions)
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise ArtifactError(f"{self.root}: not an episode store (no {MANIFEST}) and not empty")
            if game is None or num_actions is None:
                raise ArtifactError(f"{self.root}: no episode store here; give game and num_actions to create one")
            self.game, self.num_actions = game, int(num_actions)
            self._entries: list[dict] = []
            self._write_manifest()

    def _open(self, manifest_path: Path, game: str | None, num_actions: int | None) -> None:
        m = read_json(manifest_path)
        try:
            if m["format"] != FORMAT_VERSION:
                raise ArtifactError(f"{manifest_path}: store format {m['format']!r}, this code reads {FORMAT_VERSION}")
            self.game, self.num_actions, self._entries = str(m["game"]), int(m["num_actions"]), list(m["episodes"])
            entries = [(e["file"], int(e["num_steps"]), int(e["bytes"]), str(e["sha256"])) for e in self._entries]
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{manifest_path}: malformed manifest (missing or bad {e})") from None
        for e in self._entries:
            if "writes" in e and not _valid_writes(e["writes"], int(e["num_steps"])):
                raise ArtifactError(f"{manifest_path}: {e['file']}: writes {e['writes']!r} must be increasing step "
                                    f"counts ending at its {e['num_steps']} steps")
        if game is not None and game != self.game:
            raise ArtifactError(f"{self.root}: store holds game {self.game!r}, not {game!r}")
        if num_actions is not None and int(num_actions) != self.num_actions:
            raise ArtifactError(f"{self.root}: store has {self.num_actions} actions, not {num_actions}")
        for i, (name, _, size, sha) in enumerate(entries):
            self._pending[i] = self._read_verified(self.root / name, size, sha)

    @staticmethod
    def _read_verified(path: Path, size: int, sha: str) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: episode file listed in the manifest is missing") from None
        if len(data) != size:
            raise ArtifactError(f"{path}: truncated or altered episode file ({len(data)} bytes, manifest says {size})")
        if hashlib.sha256(data).hexdigest() != sha:
            raise ArtifactError(f"{path}: corrupt episode file (sha256 does not match the manifest)")
        return data

    def _write_manifest(self) -> None:
        atomic_write_json(self.root / MANIFEST, {
            "format": FORMAT_VERSION,
            "game": self.game,
            "num_actions": self.num_actions,
            "num_episodes": len(self._entries),
            "num_steps": self.num_steps,
            "episodes": self._entries,
        })

    def append(self, ep: Episode, in_progress: bool = False, writes: list[int] | None = None) -> int:
        """Store one episode (file first, then manifest, both atomic); return its index.

        `in_progress`: the episode has not ended yet and will be `replace`d as it grows.
        `writes`: the step counts at which the official code would have written it so far
        (recorded in the manifest; see `write_history`).
        """
        index = len(self._entries)
        self._entries.append(self._write_episode(index, ep, in_progress, writes))
        self._write_manifest()
        self._cache[index] = ep
        return index

    def replace(self, index: int, ep: Episode, in_progress: bool = False, writes: list[int] | None = None) -> None:
        """Store `ep` in place of episode `index` (the episode in progress, grown or ended).

        The new file gets its own name, the manifest then lists it, then the old file goes: a
        killed process leaves either the old or the new episode listed, each complete.
        """
        if not 0 <= index < len(self._entries):
            raise IndexError(f"episode {index} out of range 0..{len(self._entries) - 1}")
        old = self._entries[index]["file"]
        self._entries[index] = self._write_episode(index, ep, in_progress, writes)
        self._write_manifest()
        if old != self._entries[index]["file"]:
            (self.root / old).unlink(missing_ok=True)
        self._pending.pop(index, None)
        self._cache[index] = ep
        if len(self._lengths) == len(self._entries):
            self._lengths = self._lengths.copy()
            self._lengths[index] = ep.num_steps

    def _write_episode(self, index: int, ep: Episode, in_progress: bool, writes: list[int] | None) -> dict:
        """Write the episode's file (atomic) and return its manifest entry."""
        ep.check()
        if writes is not None and not _valid_writes(writes, ep.num_steps):
            raise ValueError(f"writes {writes!r}: must be increasing step counts ending at the episode's {ep.num_steps} steps")
        if ep.act.size and (ep.act.min() < 0 or ep.act.max() >= self.num_actions):
            raise ValueError(f"Episode.act: actions must be in 0..{self.num_actions - 1}, got {ep.act.min()}..{ep.act.max()}")
        name = f"episode_{index:06d}.partial_{ep.num_steps:06d}.npz" if in_progress else f"episode_{index:06d}.npz"
        data = encode_episode(ep)
        atomic_write_bytes(self.root / name, data)
        entry = {"file": name, "num_steps": ep.num_steps, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if writes is not None:
            entry["writes"] = [int(w) for w in writes]
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def in_progress(self, index: int) -> bool:
        """Whether episode `index` was stored before it ended, to be replaced as it grows."""
        return ".partial_" in self._entries[index]["file"]

    def write_history(self, index: int) -> list[int] | None:
        """The step counts at which episode `index` was written, as recorded; None when none was
        recorded (written once, at its full length)."""
        writes = self._entries[index].get("writes")
        return None if writes is None else list(writes)

    def __getitem__(self, index: int) -> Episode:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"episode {index} out of range 0..{len(self) - 1}")
        ep = self._cache.get(index)
        if ep is None:
            ep = decode_episode(self._pending.pop(index), self.root / self._entries[index]["file"])
            self._cache[index] = ep
        return ep

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())

    @property
    def lengths(self) -> np.ndarray:
        """Steps per episode, in order of collection (read on every sample: kept in sync, not rebuilt)."""
        if len(self._lengths) != len(self._entries):
            self._lengths = np.array([int(e["num_steps"]) for e in self._entries], dtype=np.int64)
        return self._lengths

    def copy_to(self, dst_root: str | Path, overwrite: bool = False) -> EpisodeStore:
        """Copy the whole store to `dst_root` (built aside, then renamed into place)."""
        dst = Path(dst_root)
        if dst.exists() and any(dst.iterdir()) and not overwrite:
            raise ArtifactError(f"{dst}: destination exists and is not empty")
        with atomic_directory(dst) as tmp:
            for e in self._entries:
                shutil.copyfile(self.root / e["file"], tmp / e["file"])
            shutil.copyfile(self.root / MANIFEST, tmp / MANIFEST)
        return EpisodeStore(dst)
