"""The ``garden`` command: one typer app, its subcommands in modules by purpose (peer, pipeline)."""

from __future__ import annotations

from garden.cli import control, demo, logs, mission, peer, pipeline, service  # noqa: F401  (registers the subcommands)
from garden.cli.common import EXIT_CONFIG, EXIT_NO_DAEMON, app

__all__ = ["EXIT_CONFIG", "EXIT_NO_DAEMON", "app", "main"]


def main() -> None:
    app(prog_name="garden")
