"""``garden service install|uninstall``: run this machine's peer as a service of the user's login (a systemd
user unit, a launchd agent, a scheduled task), so that it keeps running without a terminal and comes back
after a crash or a reboot. The files themselves come from ``garden.daemon.service_unit``; this module writes them
and asks the service manager to pick them up.

A service manager that cannot be reached (no user session bus in a container, no ``systemctl`` at all) is
not an error: the file is written, and one line says what to run by hand once it can be reached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from garden.cli.common import app, fail, settings_from
from garden.config import CONFIG_ENV
from garden.daemon.service_unit import (
    LAUNCHD_LABEL,
    SERVICE_NAME,
    ServiceSpec,
    launchd_plist,
    systemd_unit,
    unit_path,
    windows_delete_command,
    windows_end_command,
    windows_run_command,
    windows_task_command,
)

service_app = typer.Typer(
    name="service",
    help="Run this peer as a service of your login: started at login, restarted after a crash.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")

COMMAND_TIMEOUT = 60.0  # seconds one systemctl/launchctl/schtasks call may take
_OWN_FLAGS = ("--data-dir", "--config")  # options of install itself: the unit passes them as GARDEN_* vars


@service_app.command()
def install(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The peer's data dir (default: as `garden run`)."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE", help="TOML config file the service reads."),
    run_arg: list[str] | None = typer.Option(
        None, "--run-arg", metavar="FLAG", help="A flag for `garden run`, e.g. --run-arg=--join=MADDR. Repeatable."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the file and where it goes; write nothing."),
    no_start: bool = typer.Option(False, "--no-start", help="Enable the service, but start it only at next login."),
    run_args: list[str] | None = typer.Argument(
        None, metavar="[-- RUN FLAGS]", help="More `garden run` flags, after `--`.", show_default=False
    ),
) -> None:
    """Install `garden run` as a service of your login and start it (systemd, launchd or Task Scheduler)."""
    spec = _spec(data_dir, config, [*(run_arg or []), *(run_args or [])])
    if sys.platform == "win32":
        _install_windows(spec, dry_run, start=not no_start)
        return
    path = _unit_path()
    content = systemd_unit(spec) if sys.platform.startswith("linux") else launchd_plist(spec)
    if dry_run:
        typer.echo(f"garden: dry run: would write {path}", err=True)
        typer.echo(content, nl=False)
        return
    if sys.platform == "darwin":
        # launchd does not create the directory of StandardOutPath/StandardErrorPath: the agent would not start.
        (spec.data_dir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
    changed = path.exists() and path.read_text() != content
    _write(path, content)
    typer.echo(f"wrote {path}")
    if sys.platform.startswith("linux"):
        enable = ["systemctl", "--user", "enable", *([] if no_start else ["--now"]), SERVICE_NAME]
        if _manage([["systemctl", "--user", "daemon-reload"], enable]):
            typer.echo(f"{SERVICE_NAME} enabled" + ("" if no_start else " and started") + "; see it with `garden logs`")
        if changed:  # `enable --now` leaves a running peer as it is
            typer.echo(f"a peer already running keeps its old flags until: systemctl --user restart {SERVICE_NAME}")
        typer.echo(f"to keep it running while you are logged out, run: loginctl enable-linger {_user()}")
    elif no_start:
        typer.echo("the agent starts at your next login")
    elif _manage([["launchctl", "unload", str(path)], ["launchctl", "load", "-w", str(path)]], may_fail=1):
        typer.echo("agent loaded and started; see it with `garden logs`")


@service_app.command()
def uninstall(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be stopped and removed; do nothing."),
) -> None:
    """Stop the service, disable it and remove its file (the data dir and its logs stay)."""
    if sys.platform == "win32":
        _uninstall_windows(dry_run)
        return
    path = _unit_path()
    if not path.exists():
        typer.echo(f"garden: no service installed at {path}; nothing to do")
        return
    if sys.platform.startswith("linux"):
        stop = [["systemctl", "--user", "disable", "--now", SERVICE_NAME]]
        reload = [["systemctl", "--user", "daemon-reload"]]
        by_hand = f"systemctl --user stop {SERVICE_NAME}; systemctl --user daemon-reload"
    else:
        stop, reload = [["launchctl", "unload", "-w", str(path)]], []
        by_hand = f"launchctl remove {LAUNCHD_LABEL}"
    if dry_run:
        for argv in stop + reload:
            typer.echo(f"would run: {' '.join(argv)}")
        typer.echo(f"would remove {path}")
        return
    _manage(stop, by_hand=by_hand)
    path.unlink()
    # what `systemctl disable` removes, should it not have run: else a dangling link names a missing unit
    wants = path.parent / "default.target.wants" / path.name
    if wants.is_symlink():
        wants.unlink()
    typer.echo(f"removed {path}")
    if reload:
        _manage(reload, quiet=True)


def _spec(data_dir: Path | None, config: Path | None, run_args: list[str]) -> ServiceSpec:
    """The service's spec, with absolute paths (a service does not start in this shell's directory)."""
    for arg in run_args:
        if arg.split("=", 1)[0] in _OWN_FLAGS:
            raise fail(f"give {arg.split('=', 1)[0]} to `garden service install` itself, not as a run flag", 2)
    _check_run_args(run_args)
    settings = settings_from({"data_dir": data_dir}, config)  # the data dir `garden run` would use; checks config
    # Only a config file chosen here is pinned; without one the daemon looks in the default place itself.
    chosen = config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    return ServiceSpec(
        executable=[sys.executable, "-m", "garden", "run", *run_args],
        data_dir=settings.data_dir.absolute(),
        config_file=chosen.expanduser().absolute() if chosen else None,
        env={},
    )


def _check_run_args(run_args: list[str]) -> None:
    """Parse the flags as `garden run` will, so that a typo fails now and not at every restart of the service."""
    run_command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    try:
        run_command.make_context("garden run", list(run_args))
    except typer.TyperException as e:  # click's usage errors (typer carries its own click)
        raise fail(f"not a valid `garden run` flag list {run_args}: {e.format_message()}", 2) from None


def _unit_path() -> Path:
    try:
        return unit_path(sys.platform, Path.home())
    except ValueError as e:
        raise fail(str(e), 2) from None


def _write(path: Path, content: str) -> None:
    """Atomically: a service manager reading the unit never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def _manage(steps: list[list[str]], may_fail: int = 0, quiet: bool = False, by_hand: str | None = None) -> bool:
    """Run the service manager's commands in order; the first ``may_fail`` may fail (e.g. unloading what was
    not loaded). On a failure, warn with the commands to run by hand and give False: the caller's file is
    written or removed either way, so this is never an exit code. ``by_hand`` replaces the commands the
    warning suggests (after an uninstall, the unit file they would need is gone)."""
    tool = steps[0][0]
    by_hand = by_hand or " && ".join(" ".join(argv) for argv in steps[may_fail:])
    if shutil.which(tool) is None:
        why = f"{tool} not found"
    else:
        why = ""
        for index, argv in enumerate(steps):
            result = _call(argv)
            if result and index >= may_fail:
                why = f"`{' '.join(argv)}` failed: {result}"
                break
    if why and not quiet:
        typer.echo(f"garden: warning: {why}; run by hand: {by_hand}", err=True)
    return not why


def _call(argv: list[str] | str) -> str:
    """Run one command; give its error (a line) when it fails, else ''."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode == 0:
        return ""
    message = " ".join((done.stderr or done.stdout).split())
    return message or f"exit code {done.returncode}"


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "$USER"


def _install_windows(spec: ServiceSpec, dry_run: bool, start: bool) -> None:
    try:
        command = windows_task_command(spec)
    except ValueError as e:
        raise fail(str(e), 2) from None
    typer.echo(command)
    if dry_run:
        return
    error = _call(command)  # a string: CreateProcess gets the line exactly as printed
    if error:
        typer.echo(f"garden: warning: schtasks failed: {error}; run the line above by hand", err=True)
        return
    if start:
        error = _call(windows_run_command())
        if error:
            typer.echo(f"garden: warning: the task is created but did not start: {error}", err=True)
    typer.echo("task created: the peer starts at every logon; see it with `garden logs`")


def _uninstall_windows(dry_run: bool) -> None:
    for command in (windows_end_command(), windows_delete_command()):
        typer.echo(command)
    if dry_run:
        return
    _call(windows_end_command())  # fails when the task is not running: that is fine
    error = _call(windows_delete_command())
    if error:
        typer.echo(f"garden: no scheduled task removed: {error}")
    else:
        typer.echo("task removed")
