"""Files and directories put in place so that a crash, a kill -9 or a power cut never leaves half of one.

A rename is atomic, but only what reached the disk survives a power cut: the data of a file renamed into
place must be flushed first (else the new name may point at an empty file), and the directory that holds
the name after (else the rename itself may be lost). And a directory that replaces another is swapped
with it, never put in place after the old one was deleted: between the two there would be neither.

Level 0: any package may use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h: swap two names atomically


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then every directory (deepest first), ``root`` included."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            directories.append(path)
        else:
            fsync_path(path)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_path(directory)


def replace_file(tmp: Path, path: Path) -> None:
    """Rename the finished file ``tmp`` over ``path``: its data flushed first, the directory's entry after."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole, or what it held before: never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        replace_file(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def swap_dir(staging: Path, final: Path) -> None:
    """Put the finished directory ``staging`` in place as ``final``. Its files are flushed first. An existing
    ``final`` is swapped out in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``) and only then
    deleted; where the kernel or file system cannot swap, the old one is renamed aside first
    (``final.old``) and :func:`recover_dir` brings it back if a crash came between the two renames."""
    fsync_tree(staging)
    if not final.exists():
        os.replace(staging, final)
        fsync_path(final.parent)
        return
    if _exchange(staging, final):
        fsync_path(final.parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old one, under the staging name now
        return
    aside = _aside(final)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(staging, final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """After a crash in :func:`swap_dir`'s fallback: the old ``final`` back in place when the new one never
    arrived, or the old one's leftovers deleted when it did."""
    aside = _aside(final)
    if not aside.exists():
        return
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, final)
        fsync_path(final.parent)


def _aside(final: Path) -> Path:
    return final.with_name(f"{final.name}.old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where that is not possible here."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or not Linux
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system that cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))
