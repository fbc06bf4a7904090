"""Where models live on this machine: converted GGUF files and hub downloads.

A daemon keeps both in its data dir (``<data dir>/models``), so that they count toward ``--max-disk`` and the
disk keeper may prune hub models no one uses when the data dir is over its cap; :func:`use_data_dir` sets
that up before anything loads (and its worker processes inherit it through the environment). The
``garden`` commands run outside a daemon (``shake``, ``train``, ``eval``) use the user's cache and the
Hugging Face cache as any program does. ``GARDEN_CACHE_DIR`` set by the user wins for conversions (tests
share one conversion between many daemons that way).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs

CACHE_ENV = "GARDEN_CACHE_DIR"
"""Where converted GGUF files go (``<dir>/gguf``)."""
HUB_CACHE_ENV = "GARDEN_HUB_CACHE"
"""Where hub models are downloaded to; unset: the Hugging Face cache."""
STUDENTS_ENV = "GARDEN_STUDENTS_DIR"
"""Where a daemon notes which pulled checkpoint each ``mission:<id>`` model is (``<id>.json``); its worker
processes inherit it, so a teacher or student named ``mission:<id>`` loads there too."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_path("garden", appauthor=False))


def hub_cache_dir() -> str | None:
    """The ``cache_dir`` to hand transformers for hub downloads (None: the Hugging Face cache)."""
    return os.environ.get(HUB_CACHE_ENV) or None


def use_data_dir(models: Path) -> None:
    """A daemon's models go under ``models`` (``<data dir>/models``): hub downloads always, conversions unless
    ``GARDEN_CACHE_DIR`` says otherwise."""
    models.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(CACHE_ENV, str(models))
    os.environ[HUB_CACHE_ENV] = str(models / "hub")
    os.environ[STUDENTS_ENV] = str(models / "students")


def student_dir(mission_id: str) -> Path | None:
    """The directory a daemon pulled the swarm's model ``mission:<mission_id>`` into (every file checked), or
    None when this machine does not have it."""
    note = student_note(mission_id)
    try:
        path = Path(note["path"]) if note is not None else None
    except (KeyError, TypeError):
        return None
    return path if path is not None and (path / "config.json").is_file() else None


def student_note(mission_id: str) -> dict | None:
    """What :func:`note_student_dir` noted of ``mission:<mission_id>`` (path, epoch, manifest), or None."""
    root = os.environ.get(STUDENTS_ENV)
    if not root:
        return None
    try:
        note = json.loads((Path(root) / f"{mission_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def note_student_dir(mission_id: str, path: Path, epoch: int, manifest_sha256: str) -> None:
    """Note where ``mission:<mission_id>`` lives now (after its files were pulled and checked): ``path`` a
    transformers directory, or a checkpoint holding one in ``model/`` (a trainer's own)."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    root = Path(os.environ[STUDENTS_ENV])
    root.mkdir(parents=True, exist_ok=True)
    note = {"path": str(path), "epoch": epoch, "manifest_sha256": manifest_sha256}
    staging = root / f".{mission_id}.json.partial"
    staging.write_text(json.dumps(note))
    os.replace(staging, root / f"{mission_id}.json")


def hub_entry(hub_id: str, root: Path) -> Path:
    """The Hugging Face cache's directory for a hub model (``models--org--name``)."""
    return root / ("models--" + hub_id.replace("/", "--"))


def is_hub_cached(hub_id: str) -> bool:
    """Whether a hub model's weights are already downloaded into the hub cache garden uses."""
    root = hub_cache_dir()
    if root is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        root = HF_HUB_CACHE
    snapshots = hub_entry(hub_id, Path(root)) / "snapshots"
    return any(snapshots.glob("*/config.json")) and any(
        p for pattern in ("*/*.safetensors", "*/*.bin") for p in snapshots.glob(pattern)
    )


@dataclass(frozen=True)
class CachedModel:
    """A hub model downloaded into the hub cache garden uses: ``ref`` its hub id."""

    ref: str
    path: Path
    size: int
    last_used: float


def cached_hub_models() -> list[CachedModel]:
    """The hub models in the daemon's hub cache (none when garden uses the Hugging Face cache, which is the
    user's own), with their sizes on disk and when they were last downloaded or loaded."""
    root = hub_cache_dir()
    if root is None or not Path(root).is_dir():
        return []
    found = []
    for entry in sorted(Path(root).glob("models--*")):
        size, newest = 0, entry.stat().st_mtime
        for path in entry.rglob("*"):
            try:
                stat = path.lstat()
            except OSError:
                continue
            size += stat.st_size if path.is_file() and not path.is_symlink() else 0
            newest = max(newest, stat.st_mtime)
        found.append(CachedModel(entry.name.removeprefix("models--").replace("--", "/"), entry, size, newest))
    return found


def touch(hub_id: str) -> None:
    """Mark a hub model as just used (the disk keeper prunes the least recently used first)."""
    root = hub_cache_dir()
    if root is not None:
        entry = hub_entry(hub_id, Path(root))
        if entry.is_dir():
            os.utime(entry, (time.time(), time.time()))
