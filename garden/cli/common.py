"""What every ``garden`` subcommand shares: the typer app, the console, exit codes, settings and errors."""

from __future__ import annotations

import os
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


_tokens: dict[str, str] = {}
"""The local port's token, read from a data dir (:func:`daemon_url`), by the URL of the daemon it belongs to."""


def daemon_url(url: str | None, data_dir: Path | None, config: Path | None) -> str:
    """--url, else the URL the local daemon wrote into its data dir, else the configured port. The token of
    that daemon's port (its data dir's ``http-token``) goes with every request to it (:func:`auth_headers`)."""
    from garden.daemon.datadir import DataDir

    settings = settings_from({"data_dir": data_dir}, config)
    local = DataDir(settings.data_dir)
    runtime = local.read_runtime()
    if url:
        found = url.rstrip("/")
    elif runtime and isinstance(runtime.get("url"), str):
        found = runtime["url"]
    else:
        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "") else settings.http_host
        found = f"http://{host}:{settings.http_port}"
    token = local.read_http_token()
    if token and (not url or (runtime and runtime.get("url") == found)):
        _tokens[found] = token
    return found


def auth_headers(url: str) -> dict[str, str]:
    """What a request to the daemon at ``url`` carries: its token when known (the data dir, else the
    ``GARDEN_TOKEN`` environment variable, for a peer on another machine)."""
    token = _tokens.get(url) or os.environ.get("GARDEN_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def call_daemon(
    method: str, url: str, path: str, ok: tuple[int, ...] = (200,), timeout: float = 15, **kwargs: Any
) -> Any:
    """One HTTP request to a daemon; a clear one-line error (and exit 1) when it is not running or refuses."""
    import httpx

    try:
        headers = {**auth_headers(url), **kwargs.pop("headers", {})}
        response = httpx.request(method, url + path, timeout=timeout, headers=headers, **kwargs)
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
