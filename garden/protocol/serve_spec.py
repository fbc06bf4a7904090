"""``--serve`` values: a model reference, optionally with a fixed layer range (``REF:START-END``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"^(?P<ref>.+):(?P<start>\d+)-(?P<end>\d+)$")


@dataclass(frozen=True)
class ServeSpec:
    model: str
    start: int | None = None  # None: the server picks the layers the swarm needs most
    end: int | None = None

    def __str__(self) -> str:
        return self.model if self.start is None else f"{self.model}:{self.start}-{self.end}"


def parse_serve_spec(text: str) -> ServeSpec:
    """``builtin:smollm2-135m`` or ``builtin:smollm2-135m:0-15`` (layers 0..14, half-open as in Python)."""
    text = text.strip()
    if not text:
        raise ValueError("an empty --serve value: give a model reference, e.g. builtin:smollm2-135m")
    match = _RANGE.match(text)
    if match is None:
        return ServeSpec(text)
    start, end = int(match["start"]), int(match["end"])
    if not start < end:
        raise ValueError(f"--serve {text}: the range {start}-{end} is empty (START-END is half-open, START < END)")
    return ServeSpec(match["ref"], start, end)
