"""What every ``garden`` subcommand shares: the typer app, the console, exit codes, settings and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from garden.config import ConfigError, GardenSettings, load_settings

app = typer.Typer(
    name="garden",
    help="Communal Garden: volunteers' PCs distil, train and serve small language models together.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

EXIT_NO_DAEMON = 1
EXIT_CONFIG = 2


def settings_from(flags: dict[str, Any], config: Path | None) -> GardenSettings:
    try:
        return load_settings(flags, config)
    except ConfigError as e:
        raise fail(str(e), EXIT_CONFIG) from None


def fail(message: str, code: int = EXIT_NO_DAEMON) -> typer.Exit:
    """Print one plain line (no wrapping: people copy commands out of it) and give the exit to raise."""
    typer.echo(f"garden: {message}", err=True)
    return typer.Exit(code)
