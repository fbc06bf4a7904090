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


def daemon_url(url: str | None, data_dir: Path | None, config: Path | None) -> str:
    """--url, else the URL the local daemon wrote into its data dir, else the configured port."""
    if url:
        return url.rstrip("/")
    from garden.daemon.datadir import DataDir

    settings = settings_from({"data_dir": data_dir}, config)
    runtime = DataDir(settings.data_dir).read_runtime()
    if runtime and isinstance(runtime.get("url"), str):
        return runtime["url"]
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "") else settings.http_host
    return f"http://{host}:{settings.http_port}"


def call_daemon(
    method: str, url: str, path: str, ok: tuple[int, ...] = (200,), timeout: float = 15, **kwargs: Any
) -> Any:
    """One HTTP request to a daemon; a clear one-line error (and exit 1) when it is not running or refuses."""
    import httpx

    try:
        response = httpx.request(method, url + path, timeout=timeout, **kwargs)
    except httpx.TransportError:
        raise fail(f"no garden daemon answers at {url}; start one with `garden run` (or pass --url)") from None
    if response.status_code not in ok:
        raise fail(f"{url}{path} answered {response.status_code}: {_error_text(response)}")
    return response


def get_json(url: str, path: str) -> Any:
    return call_daemon("GET", url, path).json()


def _error_text(response: Any) -> str:
    """FastAPI's ``detail`` (a string, or a list of field errors) as one line."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        return str(response.text[:300])
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}" for e in detail[:5]
        )
    return str(detail)[:300]
