"""``garden logs``: the daemon's log file, for a peer that runs as a service and so has no terminal. Reads the
file the daemon writes in its data dir (``garden.host.logs.log_file``), so it works whether or not the daemon runs;
``--follow`` keeps up across the daemon's own rotation (``garden.log`` renamed to ``garden.log.1`` and a new
one opened), as ``tail -F`` does."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

import typer

from garden.cli.common import app, fail, settings_from
from garden.host.logs import log_file

FOLLOW_PERIOD = 0.25  # seconds between looks at a log with nothing new
_BLOCK = 64 * 1024


@app.command()
def logs(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing lines as the daemon writes them."),
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="How many of the last lines to print first."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The data dir of the daemon whose log to show."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """Print the end of this peer's log; with -f, follow it (Ctrl+C stops)."""
    path = log_file(settings_from({"data_dir": data_dir}, config).data_dir)
    out = sys.stdout.buffer  # bytes as written: a log line is never re-encoded (or refused) on the way
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise fail(f"no log at {path}: has the daemon run with this data dir?") from None
    try:
        out.write(_last_lines(stream, lines))
        out.flush()
        if follow:
            _follow(path, stream, out)
    except KeyboardInterrupt:
        pass  # Ctrl+C is how one stops following: no traceback, exit 0
    except BrokenPipeError:
        # `garden logs | head`: the reader left. Point stdout at nothing so the exit's flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        stream.close()


def _last_lines(stream: BinaryIO, count: int) -> bytes:
    """The last ``count`` lines, reading blocks back from the end (a log may be 10 MiB); leaves the stream
    at the end of the file, where following starts."""
    end = stream.seek(0, os.SEEK_END)
    if count == 0:
        return b""
    position, data = end, b""
    # one newline more than lines wanted: the one before the first line (a last line may lack its newline)
    while position > 0 and data.count(b"\n") <= count:
        step = min(_BLOCK, position)
        position -= step
        stream.seek(position)
        data = stream.read(step) + data
    stream.seek(end)
    complete = data.endswith(b"\n")
    parts = data.split(b"\n")[: -1 if complete else None]
    return b"\n".join(parts[-count:]) + (b"\n" if complete else b"")


def _follow(path: Path, stream: BinaryIO, out: BinaryIO) -> None:
    """Print what is appended, forever. A new file at ``path`` (another inode: the log was rotated) is read
    from its start once the old one has nothing more; a file that got shorter (truncated) is read again from
    its start. While ``path`` is missing (between a rotation's rename and the new file), wait."""
    while True:
        chunk = stream.read(_BLOCK)
        if chunk:
            out.write(chunk)
            out.flush()
            continue
        time.sleep(FOLLOW_PERIOD)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            continue
        mine = os.fstat(stream.fileno())
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            rest = stream.read()  # written to the old file after the last read, before it was renamed
            if rest:
                out.write(rest)
                out.flush()
            try:
                replacement = path.open("rb")
            except FileNotFoundError:
                continue
            stream.close()
            stream = replacement
        elif current.st_size < stream.tell():
            stream.seek(0)
