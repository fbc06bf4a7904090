"""Level 7: the ``garden`` command: one typer app, its subcommands in modules by purpose.

- ``common``: the app, console, exit codes, settings and errors every subcommand shares
- ``peer``: ``run``, ``status``, ``peers``, ``version``; ``control``: ``pause``, ``resume``
- ``pipeline``: one machine's ``shake``, ``train``, ``eval``, ``generate``; ``swarm_generate``: ``generate --swarm``
- ``mission``: a lead's ``mission create|list|show|export|pull|cancel``
- ``service`` and ``logs``: running a peer as a service, and its log
- ``demo``: ``garden demo``
"""

from __future__ import annotations

from garden.cli import control, demo, feedback, logs, mission, models, peer, pipeline, service  # noqa: F401
from garden.cli.common import EXIT_CONFIG, EXIT_NO_DAEMON, app

__all__ = ["EXIT_CONFIG", "EXIT_NO_DAEMON", "app", "main"]


def main() -> None:
    app(prog_name="garden")
