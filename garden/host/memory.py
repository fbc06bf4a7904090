"""``--max-memory``: the one check of whether a model (a teacher, a student in training, a served range)
fits in the memory this peer may use now: the machine's available RAM, capped by the owner's setting.

Work that would not fit is refused before it loads, with the reason where the owner looks (``/status``),
rather than pushing the owner's programs into swap or the daemon into the OOM killer.
"""

from __future__ import annotations

import psutil


def memory_budget(max_memory: int | None) -> int:
    """Bytes this peer may take now: the available RAM, or less with ``--max-memory``."""
    available = int(psutil.virtual_memory().available)
    return min(available, max_memory) if max_memory else available


def memory_shortfall(need: int, max_memory: int | None) -> str | None:
    """None when ``need`` bytes fit; else the end of a refusal, for the caller's subject: ``"about N MiB,
    M MiB available (--max-memory C MiB)"`` (``it needs`` / ``the student needs`` go before it)."""
    budget = memory_budget(max_memory)
    if need <= budget:
        return None
    cap = f" (--max-memory {max_memory / 2**20:.0f} MiB)" if max_memory else ""
    return f"about {need / 2**20:.0f} MiB, {budget / 2**20:.0f} MiB available{cap}"
