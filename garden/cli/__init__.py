"""The ``garden`` command: one typer app, its subcommands in modules by purpose (peer, pipeline)."""

from __future__ import annotations

from garden.cli import demo, mission, peer, pipeline  # noqa: F401  (registers the subcommands on the app)
from garden.cli.common import EXIT_CONFIG, EXIT_NO_DAEMON, app

__all__ = ["EXIT_CONFIG", "EXIT_NO_DAEMON", "app", "main"]


def main() -> None:
    app(prog_name="garden")
