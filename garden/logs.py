"""One log format for every garden process (the daemon, the trainer worker): time, level, logger, message,
on stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper())
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # hivemind's own handler would replace this format; let its records reach ours instead.
    # Its INFO lines are about its internals: keep them for --log-level debug.
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
