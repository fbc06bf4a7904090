"""Running as a service: the unit, agent and task files (garden.daemon.service_unit), `garden service install|uninstall`
on this machine (Linux: a temp HOME, the real systemctl or none), the daemon's rotating log file and
`garden logs` (last lines, following across a rotation)."""

from __future__ import annotations

import os
import plistlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from garden.cli.logs import _last_lines
from garden.daemon.service_unit import (
    ServiceSpec,
    launchd_plist,
    systemd_unit,
    unit_path,
    windows_argv,
    windows_task_command,
)

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="the CLI tests install a Linux/macOS service"),
    pytest.mark.heavy(7),  # seconds in `make check`: see tests/conftest.py
]

GARDEN = [sys.executable, "-m", "garden"]
TRICKY = ["--join", "/ip4/1.2.3.4/tcp/31337/p2p/Qm with space", 'a "quoted" \\ word', "100%", "$HOME", ";", "tab\there"]
UNIT_KEYS = {
    "Unit": {"Description", "After"},
    "Service": {
        "Type", "ExecStart", "Environment", "Restart", "RestartSec", "KillSignal", "TimeoutStopSec", "Nice",
        "IOSchedulingClass",
    },
    "Install": {"WantedBy"},
}  # fmt: skip

LOGGING_CHILD = """
import logging, sys
from pathlib import Path
from garden.host.logs import setup_logging
setup_logging("info", Path(sys.argv[1]))
logging.getLogger("garden.test").info("into the file")
(handler,) = [h for h in logging.getLogger().handlers if hasattr(h, "maxBytes")]
print(handler.maxBytes, handler.backupCount, handler.baseFilename)
"""


@pytest.fixture(scope="module", autouse=True)
def logging_child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """setup_logging in its own process (its handlers must not leak into pytest's). It imports hivemind, which
    takes ~6 s: started before the module's first test, it runs while the others do."""
    data_dir = tmp_path_factory.mktemp("logging") / "not-yet-created"
    child = subprocess.Popen(
        [sys.executable, "-c", LOGGING_CHILD, str(data_dir / "logs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield child, data_dir
    if child.poll() is None:
        child.kill()
        child.wait()


def garden(*args: str, home: Path, path_env: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, HOME=str(home), **env)
    if path_env is not None:
        environ["PATH"] = path_env
    return subprocess.run([*GARDEN, *args], capture_output=True, text=True, env=environ, timeout=60)


# --- the files -----------------------------------------------------------------------------------------


def systemd_words(line: str) -> list[str]:
    """A command line as systemd splits it (systemd.syntax(7) quoting, then %% and $$), for the round trip."""
    line = line.replace("%%", "\0")
    assert "%" not in line, f"an unescaped specifier in {line!r}"
    words, i = [], 0
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", ";": ";", "s": " "}
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word, quote = [], None
        while i < len(line) and (quote or line[i] != " "):
            char = line[i]
            if char == "\\":
                if line[i + 1] == "x":
                    word.append(chr(int(line[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                word.append(escapes[line[i + 1]])
                i += 2
                continue
            if char in "\"'" and quote in (None, char):
                quote = None if quote else char
            else:
                word.append(char)
            i += 1
        assert quote is None, f"unterminated quote in {line!r}"
        words.append("".join(word).replace("\0", "%"))
    for word in words:
        assert re.search(r"\$(?!\$)", word.replace("$$", "")) is None, f"an unescaped $ in {word!r}"
    return [word.replace("$$", "$") for word in words]


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """The unit as sections of (key, value), failing on any line, section or key systemd would not take."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if match := re.fullmatch(r"\[(\w+)\]", line):
            current = match[1]
            assert current in UNIT_KEYS and current not in sections, f"section {current}"
            sections[current] = []
            continue
        key, sep, value = line.partition("=")
        assert current and sep and key in UNIT_KEYS[current], f"unexpected line in [{current}]: {line!r}"
        sections[current].append((key, value))
    return sections


def test_systemd_unit_round_trips_every_argument() -> None:
    spec = ServiceSpec(
        executable=["/usr/bin/python3", "-m", "garden", "run", *TRICKY],
        data_dir=Path("/home/x/my data %i"),
        config_file=Path("/home/x/garden.toml"),
        env={"EXTRA": 'say "hi" $NOT'},
    )
    unit = parse_unit(systemd_unit(spec))
    service = dict(unit["Service"])
    assert systemd_words(service["ExecStart"]) == spec.executable
    environment = [value for key, value in unit["Service"] if key == "Environment"]
    assert [systemd_words(value.replace("$", "$$")) for value in environment] == [
        ["GARDEN_DATA_DIR=/home/x/my data %i"],
        ["GARDEN_CONFIG=/home/x/garden.toml"],
        ['EXTRA=say "hi" $NOT'],  # no variable expansion in Environment=: $ stays as it is
    ]
    assert {k: v for k, v in unit["Service"] if k not in ("ExecStart", "Environment")} == {
        "Type": "simple",
        "Restart": "on-failure",
        "RestartSec": "10",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "20",
        "Nice": "10",
        "IOSchedulingClass": "idle",
    }
    assert dict(unit["Unit"])["After"] == "network-online.target"
    assert unit["Install"] == [("WantedBy", "default.target")]
    with pytest.raises(ValueError, match="absolute"):
        systemd_unit(ServiceSpec(["python3", "-m", "garden", "run"], Path("/d"), None, {}))


def test_launchd_plist_has_the_agent_keys() -> None:
    spec = ServiceSpec(["/usr/bin/python3", "-m", "garden", "run", *TRICKY], Path("/Users/x/data"), None, {})
    plist = plistlib.loads(launchd_plist(spec).encode())
    assert plist == {
        "Label": "org.communalgarden.garden",
        "ProgramArguments": spec.executable,
        "EnvironmentVariables": {"GARDEN_DATA_DIR": "/Users/x/data"},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": 20,
        "StandardOutPath": "/Users/x/data/logs/launchd.stdout.log",
        "StandardErrorPath": "/Users/x/data/logs/launchd.stderr.log",
        "ProcessType": "Background",
        "Nice": 10,
    }


def windows_split(line: str) -> list[str]:
    """A command line as the Microsoft C runtime splits it (what schtasks and python.exe do)."""
    args: list[str] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i == n:
            break
        arg, quoted = [], False
        while i < n and (quoted or line[i] not in " \t"):
            backslashes = 0
            while i < n and line[i] == "\\":
                backslashes += 1
                i += 1
            if i < n and line[i] == '"':
                arg.append("\\" * (backslashes // 2))
                if backslashes % 2:
                    arg.append('"')
                else:
                    quoted = not quoted
                i += 1
            else:
                arg.append("\\" * backslashes)
                if i < n and (quoted or line[i] not in " \t"):
                    arg.append(line[i])
                    i += 1
        args.append("".join(arg))
    return args


def test_windows_task_command_quotes_twice() -> None:
    python = r"C:\Program Files\Python311\python.exe"
    run = [python, "-m", "garden", "run", "--join", 'a"b', "trailing\\", "back\\\\slash"]
    spec = ServiceSpec(run, Path(r"C:\Users\Bob Smith\garden"), Path(r"C:\Users\Bob Smith\g.toml"), {})
    command = windows_task_command(spec)
    assert re.fullmatch(r'schtasks /Create /TN "Communal Garden" /SC ONLOGON /RL LIMITED /TR ".+" /F', command)
    assert command.startswith(r'schtasks /Create /TN "Communal Garden" /SC ONLOGON /RL LIMITED /TR "\"C:\Program')
    words = windows_split(command)
    assert words[:9] + words[10:] == [
        "schtasks", "/Create", "/TN", "Communal Garden", "/SC", "ONLOGON", "/RL", "LIMITED", "/TR", "/F"
    ]  # fmt: skip
    assert windows_split(words[9]) == windows_argv(spec)
    assert windows_argv(spec)[-4:] == ["--data-dir", str(spec.data_dir), "--config", str(spec.config_file)]
    with pytest.raises(ValueError, match="at most 261"):
        windows_task_command(ServiceSpec([python, "run", "x" * 250], Path("C:/d"), None, {}))
    with pytest.raises(ValueError, match="environment variables"):
        windows_task_command(ServiceSpec([python], Path("C:/d"), None, {"X": "1"}))


def test_unit_paths() -> None:
    home = Path("/home/x")
    assert unit_path("linux", home) == home / ".config/systemd/user/garden.service"
    assert unit_path("darwin", home) == home / "Library/LaunchAgents/org.communalgarden.garden.plist"
    with pytest.raises(ValueError):
        unit_path("win32", home)


# --- garden service install / uninstall ----------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes a systemd user unit")
def test_install_dry_run_writes_nothing(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data dir"
    done = garden(
        "service", "install", "--dry-run", "--data-dir", str(data), "--run-arg=--log-level=debug", "--",
        "--join", "/ip4/10.0.0.1/tcp/4000", home=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = home / ".config/systemd/user/garden.service"
    assert f"would write {unit}" in done.stderr
    assert not home.exists()
    service = parse_unit(done.stdout)["Service"]
    assert systemd_words(dict(service)["ExecStart"]) == [
        *GARDEN, "run", "--log-level=debug", "--join", "/ip4/10.0.0.1/tcp/4000"
    ]  # fmt: skip
    assert ("Environment", f'"GARDEN_DATA_DIR={data}"') in service

    typo = garden("service", "install", "--dry-run", "--run-arg=--jion=x", home=home)
    assert typo.returncode == 2 and "No such option: --jion" in typo.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes a systemd user unit")
def test_install_without_systemctl_then_uninstall(tmp_path: Path) -> None:
    home, data, no_tools = tmp_path / "home", tmp_path / "data", tmp_path / "empty-bin"
    no_tools.mkdir()
    done = garden("service", "install", "--data-dir", str(data), home=home, path_env=str(no_tools))
    assert done.returncode == 0, done.stderr
    unit = home / ".config/systemd/user/garden.service"
    assert f"wrote {unit}" in done.stdout
    assert "warning: systemctl not found; run by hand: systemctl --user daemon-reload && " in done.stderr
    text = unit.read_text()
    assert systemd_words(dict(parse_unit(text)["Service"])["ExecStart"]) == [*GARDEN, "run"]
    verify_with_systemd(text, tmp_path)
    again = garden(
        "service", "install", "--data-dir", str(data), "--", "--roles", "shaker", home=home, path_env=str(no_tools)
    )
    assert again.returncode == 0, again.stderr
    assert "keeps its old flags until: systemctl --user restart garden.service" in again.stdout
    assert systemd_words(dict(parse_unit(unit.read_text())["Service"])["ExecStart"])[-2:] == ["--roles", "shaker"]

    # what `systemctl --user enable` would have linked: uninstall removes it with the unit
    wants = unit.parent / "default.target.wants" / unit.name
    wants.parent.mkdir()
    wants.symlink_to(unit)
    gone = garden("service", "uninstall", home=home, path_env=str(no_tools))
    assert gone.returncode == 0, gone.stderr
    assert f"removed {unit}" in gone.stdout and not unit.exists() and not wants.is_symlink()
    assert "run by hand: systemctl --user stop garden.service" in gone.stderr
    twice = garden("service", "uninstall", home=home, path_env=str(no_tools))
    assert twice.returncode == 0 and f"no service installed at {unit}" in twice.stdout


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="needs systemctl")
def test_install_when_systemctl_cannot_reach_a_user_manager(tmp_path: Path) -> None:
    """The real systemctl, pointed at a runtime dir and bus that do not exist (as in a container without a
    user session): the unit stays written, the exit is 0, the warning says what failed."""
    home, runtime = tmp_path / "home", tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    bus = dict(XDG_RUNTIME_DIR=str(runtime), DBUS_SESSION_BUS_ADDRESS=f"unix:path={runtime}/no-bus")
    done = garden("service", "install", "--no-start", "--data-dir", str(tmp_path / "data"), home=home, **bus)
    assert done.returncode == 0, done.stderr
    assert (home / ".config/systemd/user/garden.service").is_file()
    assert "warning: `systemctl --user daemon-reload` failed: " in done.stderr
    assert "run by hand: systemctl --user daemon-reload && systemctl --user enable garden.service" in done.stderr


def verify_with_systemd(text: str, tmp_path: Path) -> None:
    """`systemd-analyze verify --user`, which also checks that ExecStart's program exists: the unit is
    rewritten to start it through a link whose path needs quoting and escaping (a space, a %)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # parse_unit has checked every section and key
    odd = tmp_path / "odd dir %i"  # unescaped, %i would become the (empty) instance name
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    spec = ServiceSpec([str(odd / "python"), "-m", "garden", "run", *TRICKY], tmp_path / "d", None, {})
    units = tmp_path / "units"
    units.mkdir()
    for name, content in (("garden.service", text), ("odd-garden.service", systemd_unit(spec))):
        (units / name).write_text(content)
    # a user manager's runtime dir, which a container has not; short: the socket paths systemd puts in it
    # must fit in 108 bytes, and pytest-xdist's temp paths are long
    runtime = Path(tempfile.mkdtemp(prefix="gv-", dir="/tmp"))
    os.chmod(runtime, 0o700)
    try:
        done = subprocess.run(
            [analyze, "verify", "--user", *(str(p) for p in sorted(units.iterdir()))],
            capture_output=True,
            text=True,
            env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)),
            timeout=60,
        )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


# --- the log file and garden logs ----------------------------------------------------------------------


def test_setup_logging_writes_a_rotating_file(logging_child: tuple[subprocess.Popen[str], Path]) -> None:
    child, data_dir = logging_child
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    log = data_dir / "logs" / "garden.log"
    assert out.split() == [str(10 * 1024 * 1024), "5", str(log)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    garden\.test: into the file\n", log.read_text())
    assert re.search(r"(?m)^\d\d:\d\d:\d\d INFO    garden\.test: into the file$", err)
    # created before the data dir, which holds the private key: neither may be readable by others
    assert (data_dir.stat().st_mode & 0o777, (data_dir / "logs").stat().st_mode & 0o777) == (0o700, 0o700)


def test_last_lines_reads_back_across_blocks(tmp_path: Path) -> None:
    log = tmp_path / "log"
    lines = [f"line {i} " + "x" * (i % 300) for i in range(2000)]  # ~300 KiB: several 64 KiB blocks
    log.write_text("\n".join(lines) + "\n")
    with log.open("rb") as f:
        assert _last_lines(f, 1500).decode() == "\n".join(lines[-1500:]) + "\n"
        assert f.tell() == log.stat().st_size
        assert _last_lines(f, 5000).decode() == "\n".join(lines) + "\n"
        assert _last_lines(f, 0) == b""
    log.write_text("one\ntwo\nno newline yet")
    with log.open("rb") as f:
        assert _last_lines(f, 2) == b"two\nno newline yet"


def test_logs_prints_the_last_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs/garden.log").write_text("".join(f"2025-01-01 00:00:00 INFO    garden: line {i}\n" for i in range(80)))
    two = garden("logs", "-n", "2", "--data-dir", str(data), home=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.splitlines() == [f"2025-01-01 00:00:00 INFO    garden: line {i}" for i in (78, 79)]
    default = garden("logs", "--data-dir", str(data), home=tmp_path)
    assert default.stdout.splitlines()[0].endswith("line 30") and len(default.stdout.splitlines()) == 50

    missing = garden("logs", "--data-dir", str(tmp_path / "never-ran"), home=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"garden: no log at {tmp_path / 'never-ran/logs/garden.log'}: has the daemon run with this data dir?"
    )


def test_logs_follow_survives_rotation_and_truncation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = data / "logs" / "garden.log"
    log.parent.mkdir(parents=True)
    log.write_text("old 1\nold 2\n")
    follower = subprocess.Popen(
        [*GARDEN, "logs", "-f", "-n", "1", "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # as from a terminal: SIGINT at its default (a pytest-xdist worker ignores it, and children inherit that)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert follower.stdout is not None and follower.stderr is not None
    lines: queue.Queue[str] = queue.Queue()

    def read(stdout: IO[bytes]) -> None:
        for line in stdout:
            lines.put(line.decode().rstrip("\n"))

    threading.Thread(target=read, args=(follower.stdout,), daemon=True).start()
    seen: list[str] = []

    def expect(*wanted: str) -> None:
        deadline = time.monotonic() + 15
        while seen[-len(wanted) :] != list(wanted):
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"wanted {wanted}, got {seen}") from None

    def append(path: Path, text: str) -> None:
        with path.open("a") as f:
            f.write(text)

    try:
        expect("old 2")
        append(log, "appended\n")
        expect("appended")
        # a rotation as RotatingFileHandler does it, and one more line into the renamed file before the new one
        log.rename(log.with_name("garden.log.1"))
        append(log.with_name("garden.log.1"), "last of the old file\n")
        log.write_text("first of the new file, a long line to be cut shorter\n")
        expect("last of the old file", "first of the new file, a long line to be cut shorter")
        log.write_text("after truncation\n")  # copytruncate-style: same inode, shorter
        expect("after truncation")
        os.kill(follower.pid, signal.SIGINT)  # Ctrl+C
        assert follower.wait(timeout=30) == 0
        assert follower.stderr.read() == b""
        assert seen == [
            "old 2", "appended", "last of the old file", "first of the new file, a long line to be cut shorter",
            "after truncation",
        ]  # fmt: skip
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
