"""Settings precedence: flag > GARDEN_* env > config file > default, each asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from garden.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("GARDEN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config-here"))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "garden.toml"
    path.write_text('http_port = 1111\nswarm = "from-file"\nroles = ["server"]\nlog_level = "warning"\n')
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.http_port == 8765
    assert settings.http_host == "127.0.0.1"
    assert settings.host_maddr == ["/ip4/0.0.0.0/tcp/0"]
    assert settings.join == []
    assert settings.roles is None
    assert settings.announce_period == 30.0
    assert settings.data_dir.name == "garden"
    assert settings.lease_seconds == 45.0 and settings.vouch_quiet_s == 30.0


def test_file_beats_default(config_file: Path) -> None:
    settings = load_settings({}, config_file)
    assert (settings.http_port, settings.swarm, settings.roles, settings.log_level) == (
        1111, "from-file", ["server"], "warning"
    )  # fmt: skip


def test_env_beats_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GARDEN_HTTP_PORT", "2222")
    monkeypatch.setenv("GARDEN_ROLES", "shaker, trainer")
    settings = load_settings({}, config_file)
    assert settings.http_port == 2222
    assert settings.roles == ["shaker", "trainer"]
    assert settings.swarm == "from-file"  # untouched by env: still the file's


def test_flag_beats_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GARDEN_HTTP_PORT", "2222")
    settings = load_settings({"http_port": 3333, "swarm": None}, config_file)
    assert settings.http_port == 3333
    assert settings.swarm == "from-file"  # a flag that was not given (None) does not override


def test_config_file_from_env_and_platform_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "elsewhere.toml"
    explicit.write_text("http_port = 4444\n")
    monkeypatch.setenv("GARDEN_CONFIG", str(explicit))
    assert load_settings().http_port == 4444
    monkeypatch.delenv("GARDEN_CONFIG")
    platform_file = tmp_path / "xdg" / "garden" / "garden.toml"
    platform_file.parent.mkdir(parents=True)
    platform_file.write_text("http_port = 5555\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert load_settings().http_port == 5555


def test_client_mode_with_join_is_fine() -> None:
    settings = load_settings({"client_mode": True, "join": ["/ip4/10.0.0.1/tcp/1/p2p/A"]})
    assert settings.client_mode and settings.join


def test_repeatable_and_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GARDEN_JOIN", "/ip4/10.0.0.1/tcp/1/p2p/A,/ip4/10.0.0.2/tcp/2/p2p/B")
    assert load_settings().join == ["/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/2/p2p/B"]
    assert load_settings({"join": ["/ip4/10.0.0.3/tcp/3/p2p/C"]}).join == ["/ip4/10.0.0.3/tcp/3/p2p/C"]


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"http_port": 70000}, "http_port"),
        ({"roles": "shaker,cook"}, "roles"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_threads": 0}, "max_threads"),
        ({"announce_period": 0.01}, "announce_period"),
        ({"vouch_quiet_s": -1}, "vouch_quiet_s"),
        ({"lease_seconds": 1}, "lease_seconds"),
        ({"swarm": "a/b"}, "swarm name"),
        ({"swarm": ""}, "swarm name"),
        ({"client_mode": True}, "could never be joined"),
    ],
)
def test_invalid_values_name_the_key(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(flags)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("http_port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("http_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key.*http_prot"):
        load_settings({}, unknown)
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('http_port = "lots"\n')
    with pytest.raises(ConfigError, match="http_port"):
        load_settings({}, wrong_type)
