"""CPU time of a process and its descendants (a daemon, its ``p2pd``, its workers), read with psutil
from outside, as a volunteer's task manager would see it; and a process that keeps one CPU busy, the other
program of a tester's machine."""

from __future__ import annotations

import subprocess
import sys
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


def spinning_process(cpu: int) -> subprocess.Popen[str]:
    """A process at the normal priority that spins on CPU ``cpu``, started and pinned when this returns. It takes
    its scheduling policy from the calling thread: start it before lowering the caller's own. The caller kills it."""
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert spinner.stdout is not None and spinner.stdout.readline() == "\n"  # it spins on that CPU now
    return spinner
