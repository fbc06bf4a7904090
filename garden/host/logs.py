"""One log format for every garden process (the daemon, the trainer worker): time, level, logger, message,
on stderr; the daemon also keeps it in a rotating file in its data dir, so that a peer run as a service
(which has no terminal) still has a log that `garden logs` can show and that never fills the disk."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import traceback
from pathlib import Path
from types import TracebackType

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_FILE_NAME = "garden.log"
# 10 MiB x (1 + 5 backups): a week of a busy peer at INFO, at most 60 MiB on disk.
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def log_file(data_dir: Path) -> Path:
    """Where the daemon on ``data_dir`` writes its log (the rotated ones beside it: ``garden.log.1`` ...)."""
    return data_dir / "logs" / LOG_FILE_NAME


def setup_logging(level: str, log_dir: Path | None = None) -> None:
    """Log at ``level`` to stderr (times only: a person watches it live) and, given ``log_dir``, also to
    ``log_dir/garden.log`` (full dates: it is read days later), rotated at 10 MiB with 5 backups."""
    numeric = getattr(logging, level.upper())
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [stderr]
    if log_dir is not None:
        _make_private_dir(log_dir)
        file = logging.handlers.RotatingFileHandler(
            log_dir / LOG_FILE_NAME, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        file.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handlers.append(file)
    logging.basicConfig(level=numeric, handlers=handlers, force=True)
    # hivemind's own handler would replace this format; let its records reach ours instead.
    # Its INFO lines are about its internals: keep them for --log-level debug.
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """Uncaught exceptions go to the log (and so to the log file), not as bare text on stderr. One case is
    no bug: multiprocessing's fd-sharing thread (hivemind hands file descriptors to a trainer's DHT process
    that way) reports a child that died mid-handover through ``sys.excepthook``; the daemon already says that the
    child is gone, so that is one line, not a traceback."""
    if not issubclass(kind, Exception):  # Ctrl+C, SystemExit: as Python shows them
        sys.__excepthook__(kind, error, tb)
        return
    if issubclass(kind, (ConnectionError, EOFError)) and any(
        frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(tb)
    ):
        logging.getLogger("garden").warning("a child process went away while being handed a file: %s", error)
        return
    logging.getLogger("garden").critical("uncaught exception", exc_info=(kind, error, tb))


def _make_private_dir(log_dir: Path) -> None:
    """The daemon sets up logging before it creates its data dir (mode 0700: it holds the private key). A
    plain ``mkdir(parents=True)`` would create that data dir world-readable; create both private instead."""
    log_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_dir.mkdir(exist_ok=True, mode=0o700)
