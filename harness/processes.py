"""CPU time of a process and its descendants (a daemon, its ``p2pd``, its workers), read with psutil
from outside, as a volunteer's task manager would see it."""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and its descendants as of now (one started later is not in the list)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs``; one that has exited counts nothing."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total
