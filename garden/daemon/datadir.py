"""The data directory: where a peer keeps its identity, store and runtime files, and its lock.

One daemon per data dir. Two daemons writing one SQLite store and announcing one identity would
corrupt the store and confuse the swarm, so the second one must refuse to start, clearly. The lock
is an ``flock`` on a file, which the kernel releases when the holder dies: a crash never leaves a
stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garden.durable import write_bytes


class DataDirBusyError(RuntimeError):
    """Another live process holds this data dir."""


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def identity(self) -> Path:
        """The libp2p private key (mode 0600): the peer id survives restarts."""
        return self.root / "identity.key"

    @property
    def lock(self) -> Path:
        return self.root / "garden.lock"

    @property
    def store(self) -> Path:
        return self.root / "garden.sqlite3"

    @property
    def train(self) -> Path:
        """One directory per mission this peer trains: the worker's config, log, status and checkpoints."""
        return self.root / "train"

    @property
    def pulled_checkpoints(self) -> Path:
        """Checkpoints pulled from other peers (``garden mission pull``), by mission and epoch."""
        return self.root / "checkpoints"

    @property
    def models(self) -> Path:
        """Hub downloads and converted GGUF files (``garden.models.cache``): inside, so ``--max-disk`` counts them."""
        return self.root / "models"

    @property
    def runtime(self) -> Path:
        """Written by the running daemon (pid, HTTP URL, peer id) so the CLI finds it; removed on stop."""
        return self.root / "daemon.json"

    @property
    def http_token(self) -> Path:
        """The local port's token (mode 0600), new at every start: what a request needs on a non-loopback bind."""
        return self.root / "http-token"

    def new_http_token(self) -> str:
        """Write a fresh random token (readable by this user only: ``write_bytes`` creates files 0600) and
        return it."""
        token = secrets.token_urlsafe(32)
        write_bytes(self.http_token, (token + "\n").encode())
        return token

    def read_http_token(self) -> str | None:
        try:
            token = self.http_token.read_text().strip()
        except OSError:
            return None
        return token or None

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write_runtime(self, info: dict[str, Any]) -> None:
        tmp = self.runtime.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.runtime)

    def read_runtime(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.runtime.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def clear_runtime(self) -> None:
        self.runtime.unlink(missing_ok=True)


class DataDirLock:
    """Exclusive, non-blocking lock on a data dir, held for the daemon's lifetime."""

    def __init__(self, data_dir: DataDir):
        self.data_dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.ensure()
        fd = os.open(self.data_dir.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusyError(
                f"another garden daemon (pid {holder}) is already using the data dir {self.data_dir.root}; "
                "stop it first, or start this one with its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
