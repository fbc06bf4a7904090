"""The machine a benchmark ran on, for its JSON: what it has and how busy it was.

Benchmark figures (rows/s, tokens/s, join seconds) mean little without the machine that produced them, and
little on a busy one: two cores shared with a test run give half the rate. So every benchmark reports the
same ``"machine"`` object, with the 1-minute load average just before and just after its measured run: a
load well above zero before, or above what the benchmark itself runs after, says other work shared the CPU.

    machine = MachineReport().start()  # just before the measured run
    ...
    report["machine"] = machine.finish()  # just after it

Keys: ``cores``, ``ram_gb``, ``python``, ``platform``, ``processor``, ``garden`` (the version imported),
``torch`` and ``torch_threads`` (this process's, when ``finish()`` runs; only if torch is installed),
``load_average_1m`` ([before, after]; ``None`` where the OS has none), plus the keyword arguments of
``finish()``.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil


def load_average_1m() -> float | None:
    """The 1-minute load average, rounded; ``None`` where the OS keeps none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class MachineReport:
    """Records the load before the measured run (``start()``); ``finish()`` returns the machine's dict."""

    def __init__(self) -> None:
        self.load_before: float | None = None
        self.started = False

    def start(self) -> MachineReport:
        self.load_before, self.started = load_average_1m(), True
        return self

    def finish(self, **extra: Any) -> dict[str, Any]:
        """The report, with the load after the run now; ``extra`` keys (e.g. a daemon's thread cap) added."""
        if not self.started:
            raise RuntimeError("MachineReport.finish() before start(): no load average before the run")
        load_after = load_average_1m()  # first: what follows (importing torch) is not the benchmark's load
        report: dict[str, Any] = {
            "cores": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "garden": _garden_version(),
        }
        try:
            import torch  # here, not at import time: a benchmark that never loads torch pays nothing before its run
        except ImportError:
            pass
        else:
            report.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        report["load_average_1m"] = [self.load_before, load_after]
        return report | extra


def _garden_version() -> str | None:
    try:
        from garden import __version__
    except ImportError:
        return None
    return __version__
