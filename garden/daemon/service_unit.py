"""The files that make `garden run` a service of the user's login: a systemd user unit (Linux), a launchd agent
(macOS), a Task Scheduler command line (Windows). Pure text from a ``ServiceSpec``, without side effects, so
that tests can check every byte and ``garden service install --dry-run`` can show exactly what it would write.

Each format has its own quoting rules, and a path with a space, a ``%`` or a ``$`` must reach ``garden run``
unchanged: the quoting is done here, once per format, never by string concatenation in the CLI.
"""

from __future__ import annotations

import plistlib
import re
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_NAME = "garden.service"
LAUNCHD_LABEL = "org.communalgarden.garden"
WINDOWS_TASK_NAME = "Communal Garden"
WINDOWS_TR_MAX = 261  # schtasks refuses a longer /TR value
DATA_DIR_ENV = "GARDEN_DATA_DIR"
CONFIG_ENV = "GARDEN_CONFIG"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Characters a systemd word may hold without quotes (anything else is quoted; % and $ are escaped anyway).
_SYSTEMD_BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: ``executable`` is the whole argv of ``garden run`` (interpreter first, e.g.
    ``[sys.executable, "-m", "garden", "run", "--join", ...]``); the data dir and config file reach it as
    ``GARDEN_DATA_DIR`` and ``GARDEN_CONFIG`` (or as flags where the format has no environment), ``env`` adds
    further variables."""

    executable: list[str]
    data_dir: Path
    config_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """Every variable the service gets: the data dir, the config file (if any), then ``env``."""
        values = {DATA_DIR_ENV: str(self.data_dir)}
        if self.config_file is not None:
            values[CONFIG_ENV] = str(self.config_file)
        values.update(self.env)
        for name in values:
            if not _ENV_NAME.match(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        return values


def unit_path(platform: str, home: Path) -> Path:
    """Where the service file of ``platform`` (``sys.platform``: linux, darwin) goes in the user's ``home``."""
    if platform.startswith("linux"):
        return home / ".config" / "systemd" / "user" / SERVICE_NAME
    if platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    raise ValueError(f"no service file on {platform!r}: Linux has systemd units, macOS launchd agents")


# --- systemd ----------------------------------------------------------------------------------------------


def systemd_unit(spec: ServiceSpec) -> str:
    """A systemd user unit: started at login (or at boot with lingering), restarted 10 s after a crash but not
    after a clean stop, stopped with SIGTERM (the daemon's clean stop takes at most 10 s), at low CPU and
    I/O priority so that the machine's owner never waits for it."""
    if not spec.executable or not spec.executable[0].startswith("/"):
        raise ValueError(f"ExecStart needs an absolute executable path, got {spec.executable[:1]!r}")
    environment = "".join(
        f"Environment={_systemd_word(f'{name}={value}', dollar=False)}\n" for name, value in spec.environment().items()
    )
    exec_start = " ".join(_systemd_word(arg, dollar=True) for arg in spec.executable)
    return (
        "# Written by `garden service install`; remove it with `garden service uninstall`.\n"
        "[Unit]\n"
        "Description=Communal Garden peer (garden run)\n"
        # A user manager cannot order itself after the system's network-online.target (it only sees its own
        # units); the daemon retries its bootstrap peers anyway. Kept for a unit copied to the system manager.
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"{environment}"
        "Restart=on-failure\n"
        "RestartSec=10\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=20\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def _systemd_word(word: str, dollar: bool) -> str:
    """One word of a unit file value, as systemd unquotes it (systemd.syntax(7), "Quoting"): ``%`` starts a
    specifier everywhere (``%%`` is a literal one), ``$`` a variable in command lines (``$$``); anything beyond
    plain characters goes in double quotes with C escapes."""
    word = word.replace("%", "%%")
    if dollar:
        word = word.replace("$", "$$")
    if word == ";":
        return "\\;"  # a lone semicolon separates commands
    if _SYSTEMD_BARE.match(word):
        return word
    out = []
    for char in word:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# --- launchd ----------------------------------------------------------------------------------------------


def launchd_plist(spec: ServiceSpec) -> str:
    """A launchd user agent: loaded at login, restarted when it exits with an error (launchd waits 10 s
    between starts), run as a background process at nice 10. launchd gives it no terminal: stdout and stderr
    go to files beside the daemon's own log (they catch what happens before logging starts, e.g. a
    traceback at import)."""
    logs = spec.data_dir / "logs"
    plist = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(spec.executable),
        "EnvironmentVariables": spec.environment(),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": 20,
        "StandardOutPath": str(logs / "launchd.stdout.log"),
        "StandardErrorPath": str(logs / "launchd.stderr.log"),
        "ProcessType": "Background",
        "Nice": 10,
    }
    return plistlib.dumps(plist, sort_keys=False).decode()


# --- Windows ----------------------------------------------------------------------------------------------


def windows_argv(spec: ServiceSpec) -> list[str]:
    """The task's argv. Task Scheduler sets no environment variables, so the data dir and config file become
    ``garden run`` flags; other variables cannot be passed at all."""
    if spec.env:
        raise ValueError(
            f"a scheduled task cannot set environment variables ({', '.join(sorted(spec.env))}): pass them as "
            "garden run flags or in the config file"
        )
    argv = [*spec.executable, "--data-dir", str(spec.data_dir)]
    if spec.config_file is not None:
        argv += ["--config", str(spec.config_file)]
    return argv


def windows_task_command(spec: ServiceSpec) -> str:
    """The ``schtasks`` command line that creates a task running ``garden run`` at the user's logon, with
    limited rights. Quoted twice by the C runtime's rules (what schtasks and Python read): the task's own
    command line, then that line as the one /TR argument."""
    task = " ".join(_windows_arg(arg) for arg in windows_argv(spec))
    if len(task) > WINDOWS_TR_MAX:
        raise ValueError(
            f"the task's command line is {len(task)} characters, schtasks takes at most {WINDOWS_TR_MAX}: "
            "move garden run flags into a config file (--config)"
        )
    return (
        f"schtasks /Create /TN {_windows_arg(WINDOWS_TASK_NAME, always=True)} /SC ONLOGON /RL LIMITED "
        f"/TR {_windows_arg(task, always=True)} /F"
    )


def windows_delete_command() -> str:
    return f"schtasks /Delete /TN {_windows_arg(WINDOWS_TASK_NAME, always=True)} /F"


def windows_run_command() -> str:
    return f"schtasks /Run /TN {_windows_arg(WINDOWS_TASK_NAME, always=True)}"


def windows_end_command() -> str:
    return f"schtasks /End /TN {_windows_arg(WINDOWS_TASK_NAME, always=True)}"


def _windows_arg(arg: str, always: bool = False) -> str:
    """One argument as the Microsoft C runtime splits a command line (CommandLineToArgvW): quotes around
    anything with a space or tab, ``\\"`` for a quote, backslashes doubled only where a quote follows."""
    if arg and not always and not any(c in arg for c in ' \t"'):
        return arg
    out = ['"']
    backslashes = 0
    for char in arg:
        if char == "\\":
            backslashes += 1
            continue
        if char == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
        else:
            out.append("\\" * backslashes + char)
        backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)
