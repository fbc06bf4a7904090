"""``garden pause [--for 2h]`` and ``garden resume``: the owner's switch.

They ask the running daemon (``POST /pause``, ``POST /resume``). With no daemon running they write the
pause into the data dir's store instead, so that the next ``garden run`` (a service starting at boot)
starts paused, or not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from garden.cli.common import app, call_daemon, console, daemon_url, fail, settings_from

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1h30m``, ``1d`` -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", text).strip():
            raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 2h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("a pause lasts more than 0 s")
    return seconds


def _running_url(url: str | None, data_dir: Path | None, config: Path | None) -> str | None:
    """--url, else the URL the daemon of this data dir wrote at start (None: no daemon runs on it, so the
    pause goes into its store; guessing the default port could pause another data dir's daemon)."""
    if url:
        return daemon_url(url, data_dir, config)
    from garden.daemon.datadir import DataDir

    runtime = DataDir(settings_from({"data_dir": data_dir}, config).data_dir).read_runtime()
    return daemon_url(None, data_dir, config) if runtime and isinstance(runtime.get("url"), str) else None


def _offline(data_dir: Path | None, config: Path | None, pause: bool, for_s: float | None, serving: bool) -> None:
    """No daemon answers: write the pause into the store of a data dir nobody uses."""
    from garden.daemon.datadir import DataDir, DataDirBusyError, DataDirLock
    from garden.host.governor import Governor
    from garden.store import Store, StoreError

    settings = settings_from({"data_dir": data_dir}, config)
    folder = DataDir(settings.data_dir)
    if not folder.store.exists():
        raise fail(f"no garden daemon is running and {folder.root} holds no peer yet; start one with `garden run`")
    lock = DataDirLock(folder)
    try:
        lock.acquire()
    except DataDirBusyError:
        raise fail(f"the daemon using {folder.root} does not answer on its HTTP port; try again in a moment") from None
    try:
        store = Store(folder.store)
        try:
            governor = Governor(store)
            state = governor.pause(for_s, serving=serving) if pause else governor.resume()
        finally:
            store.close()
    except StoreError as e:
        raise fail(str(e)) from None
    finally:
        lock.release()
    word = "paused" if state.paused else "not paused"
    console.print(f"no daemon is running: {folder.root} is now {word}; `garden run` starts it that way")


def _send(url: str, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
    import httpx

    try:
        httpx.get(url + "/health", timeout=3)
    except httpx.TransportError:
        return None
    return call_daemon("POST", url, path, json=body).json()


def _show(state: dict[str, Any]) -> None:
    if state["paused"]:
        import time

        until = state.get("until")
        left = f" for {max(0, until - time.time()) / 60:.0f} more minute(s)" if until else " until `garden resume`"
        serving = " (serving paused too)" if state.get("serving") else " (still serving layers, relaying)"
        console.print(f"paused{left}{serving}")
    else:
        console.print(f"resumed: {state.get('working', 'working')}")


@app.command()
def pause(
    for_: str | None = typer.Option(
        None, "--for", metavar="DURATION", help="e.g. 30m, 2h, 1h30m (default: until resumed)."
    ),
    serving: bool = typer.Option(False, "--serving", help="Stop serving layers too."),
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The peer's data dir (default: this machine's)."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """Stop working within 2 s (shards are given back, trainers finish their step); stays in the swarm."""
    try:
        for_s = parse_duration(for_) if for_ else None
    except ValueError as e:
        raise fail(str(e), 2) from None
    base = _running_url(url, data_dir, config)
    state = _send(base, "/pause", {"for_s": for_s, "serving": serving or None}) if base else None
    if state is None:
        if url:
            raise fail(f"no garden daemon answers at {base}")
        return _offline(data_dir, config, True, for_s, serving)
    _show(state)


@app.command()
def resume(
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The peer's data dir (default: this machine's)."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """End a pause: work starts again within seconds."""
    base = _running_url(url, data_dir, config)
    state = _send(base, "/resume", None) if base else None
    if state is None:
        if url:
            raise fail(f"no garden daemon answers at {base}")
        return _offline(data_dir, config, False, None, False)
    _show(state)
