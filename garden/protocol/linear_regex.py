"""Regular expressions that run in linear time, for patterns that come from missions.

A mission's pattern runs on the machines of strangers. Python's ``re`` backtracks: ``^(\\w*\\s*)*ZZZ$``
takes a second on a 28-character answer and doubles with every few characters more, holding the GIL, so
the whole daemon (its HTTP port, Pause, lease renewals) freezes with it. RE2 matches in time linear in
the text, with bounded memory, and refuses what it cannot do that way (backreferences, lookarounds).
Its ``\\w``, ``\\d``, ``\\s`` and ``\\b`` are ASCII; ``\\pL`` (or ``\\p{L}``) matches any letter.
"""

from __future__ import annotations

import re
from typing import Any

INLINE_FLAGS = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s"}
"""The ``re`` flags a pattern may carry, as RE2's inline flags."""
MAX_PROGRAM_BYTES = 8 << 20
"""Memory RE2 may take for one compiled pattern (its default): a bigger one is refused, not run slowly."""


class LinearRegexError(ValueError):
    """The pattern is not one RE2 runs (bad syntax, or a feature that needs backtracking)."""


def compile_linear(pattern: str, flags: int = 0) -> Any:
    """``pattern`` compiled by RE2 (a ``re``-like object: ``search``, ``fullmatch``); ``flags`` may combine
    ``re.IGNORECASE``, ``re.MULTILINE`` and ``re.DOTALL``. Raises :class:`LinearRegexError`, naming why."""
    import re2

    unknown = flags & ~sum(INLINE_FLAGS)
    if unknown:
        raise LinearRegexError(f"flags {unknown} are not supported (only IGNORECASE, MULTILINE and DOTALL)")
    inline = "".join(letter for flag, letter in INLINE_FLAGS.items() if flags & flag)
    options = re2.Options()
    options.log_errors = False  # the error comes back to the caller, not as a line on stderr
    options.max_mem = MAX_PROGRAM_BYTES
    try:
        return re2.compile(f"(?{inline}){pattern}" if inline else pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise LinearRegexError(
            f"{reason} (patterns run in RE2, in linear time: no backreferences or lookarounds)"
        ) from None
    except TypeError as e:
        raise LinearRegexError(str(e)) from None
