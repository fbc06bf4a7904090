"""One settings object for the daemon. Precedence: command-line flags > ``GARDEN_*`` environment
variables > the TOML config file > defaults.

Every setting has exactly one definition here (name, type, default, help); the CLI flags, the env
variables, the config file keys and docs/config.md all follow from it. List settings accept a
comma-separated string in env variables (``GARDEN_ROLES=shaker,trainer``) as well as TOML arrays.
"""

from __future__ import annotations

import re

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from collections.abc import Mapping

import platformdirs
from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from garden.protocol.invite import PEER_ID, PEER_MADDR, is_invite, parse_invite
from garden.protocol.keys import DEFAULT_SWARM, DHTKeys
from garden.protocol.records import Role

LogLevel = Literal["debug", "info", "warning", "error"]
DEFAULT_HTTP_PORT = 8765
CONFIG_ENV = "GARDEN_CONFIG"


def default_data_dir() -> Path:
    return platformdirs.user_data_path("garden", appauthor=False)


def default_config_file() -> Path:
    return platformdirs.user_config_path("garden", appauthor=False) / "garden.toml"


class ConfigError(ValueError):
    """A setting is invalid; the message names the key and what is wrong."""


class GardenSettings(BaseSettings):
    """Settings of one peer. Field names are the config-file keys; ``GARDEN_<NAME>`` the env vars."""

    model_config = SettingsConfigDict(env_prefix="GARDEN_", extra="forbid", validate_default=True)

    # --- swarm -------------------------------------------------------------------------------------
    join: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Multiaddrs of peers to join, or an invite line (garden invite); none "
        "starts a new swarm.",
    )  # fmt: skip
    host_maddr: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="Multiaddrs the p2p daemon listens on."
    )
    announce_maddr: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Multiaddrs others should dial (e.g. behind port forwarding)."
    )
    client_mode: bool = Field(
        False, description="Behind NAT: dial out only, accept no incoming connections (hivemind client mode)."
    )
    reachability: Literal["auto", "public", "private"] = Field(
        "auto", description="Whether others can dial this peer: auto asks the --join peers to dial it back; public "
        "(a forwarded port, a server) relays for others; private reserves a slot on a relay and is reached through "
        "it (or, with no relay, dials out only).",
    )  # fmt: skip
    relay: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Multiaddrs of relays a private peer reserves a slot on, besides the "
        "public --join peers.",
    )  # fmt: skip
    relay_max_circuits: int = Field(16, ge=0, le=4096, description="A public peer relays at most this many "
                                    "connections per peer.")  # fmt: skip
    relay_max_reservations: int = Field(32, ge=0, le=65536, description="A public peer holds relay slots for at "
                                        "most this many private peers.")  # fmt: skip
    relay_data_limit: ByteSize = Field(ByteSize(1 << 30), ge=1024, description="Bytes one relayed connection may "
                                       "carry each way, e.g. 1GiB.")  # fmt: skip
    relay_time_limit: float = Field(3600.0, ge=1.0, le=7 * 86400, description="Seconds one relayed connection may "
                                    "last.")  # fmt: skip
    swarm: str = Field(DEFAULT_SWARM, description="Swarm name; every DHT key lives under it.")
    announce_period: float = Field(
        30.0, ge=0.5, le=3600, description="Seconds between peer-record announces; records expire after 2x."
    )
    dht_timeout: float = Field(10.0, gt=0, le=300, description="Seconds to wait for one DHT get/store.")

    # --- local HTTP port ---------------------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Address of the local HTTP port.")
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="0 picks a free port (printed).")
    http_max_body: ByteSize = Field(
        ByteSize(64 << 20), ge=1024, description="Largest HTTP request body the local port reads, e.g. 64MiB "
        "(a mission's prompts are the largest); a bigger one is answered 413.",
    )  # fmt: skip
    http_allowed_host: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More names the local HTTP port answers to (beside 127.0.0.1, localhost, [::1] and this "
        "machine's addresses), e.g. a name for it on your LAN; any other Host header is refused.",
    )

    # --- this machine ------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Identity key, local store and runtime files of this peer."
    )
    roles: Annotated[list[Role] | None, NoDecode] = Field(
        None, description="Subset of shaker,trainer,server; default: every role this machine can do."
    )
    max_threads: int | None = Field(None, ge=1, le=1024, description="Cap on torch/BLAS threads.")
    max_memory: ByteSize | None = Field(
        None,
        description="Memory a teacher, a student's training or served layers may take, e.g. 2GiB or 1500MB; work "
        "that would not fit is not taken, and /status says why (default: the machine's available RAM).",
    )
    max_cpu: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Percent of the whole machine (all cores) the daemon and its child processes may use, e.g. 50; "
        "held by thread counts and by pausing work between steps (default: no cap).",
    )
    max_disk: ByteSize | None = Field(
        None,
        description="Disk the data dir may take (rows, checkpoints, downloaded models), e.g. 20GiB; over it, copies of "
        "rows other peers also hold, old checkpoints and unused models are pruned, never the last copy of a row set, "
        "and a hub model that does not fit is not downloaded (default: no cap).",
    )
    max_upload_rate: ByteSize | None = Field(
        None, description="Bytes per second this peer sends when serving row sets and checkpoints, e.g. 2MB."
    )
    max_download_rate: ByteSize | None = Field(
        None, description="Bytes per second this peer fetches row sets and checkpoints at, e.g. 5MB."
    )
    max_serving_memory: ByteSize = Field(
        ByteSize(256 * 1024**2),
        ge=1024**2,
        description="Memory this peer spends at once on content other peers fetch from it (row sets whole, a few "
        "chunks per checkpoint stream), e.g. 64MiB; a fetch that does not fit waits, then is answered busy.",
    )
    when: Literal["always", "idle"] = Field(
        "always",
        description="always, or idle: work only while other programs leave the machine idle (and on AC power).",
    )
    idle_threshold: float = Field(
        25.0, gt=0, le=100, description="With --when idle: percent of the machine others may use while the peer works."
    )
    idle_quiet_s: float = Field(
        60.0, ge=0, le=86400, description="With --when idle: seconds of quiet before work resumes after the owner's."
    )
    pause_serving: bool = Field(
        False, description="A pause (garden pause) also stops serving layers; by default a paused peer still serves."
    )
    lease_seconds: float = Field(
        45.0, ge=2.0, le=3600.0, description="Seconds a shard lease lasts unless renewed (renewed every third)."
    )
    void_after: float = Field(
        600.0, ge=5.0, le=7 * 86400.0,
        description="Seconds after a shard's winning done record was finished past which, if no peer has served "
        "its row set to this one, the record is void here and the shard is sampled again.",
    )
    train_batch_size: int = Field(
        4, ge=1, le=4096, description="Rows per forward pass when this peer trains a mission's student."
    )
    vouch_quiet_s: float = Field(
        30.0, ge=0, le=86400, description="A lead judges its missions' checkpoints only after its heavy work "
        "(shaking, verifying row sets) has paused this many seconds, so judging never crowds that work.",
    )
    # --- which missions this peer works on -----------------------------------------------------------
    trust_lead: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Peer ids of leads whose missions this peer works on; missions of other leads are listed "
        "(marked untrusted) but never worked on. None given: every lead is trusted.",
    )
    allow_local_models: bool = Field(
        False, description="Let missions of the leads named by --trust-lead name model paths on this machine (a "
        "swarm of your own machines sharing a model directory). Without --trust-lead it has no effect: a "
        "stranger's mission never makes this machine's files its models.",
    )
    max_missions_per_lead: int = Field(
        4, ge=1, le=1000, description="Open missions kept per lead; a lead's later ones are ignored."
    )
    max_missions: int = Field(2, ge=1, le=100, description="Missions this peer shakes at once (each loads a teacher).")
    max_trainers: int = Field(1, ge=0, le=64, description="Trainer processes at once (one per mission trained).")
    mission_max_age: float = Field(
        30 * 86400.0, gt=0, description="Seconds after which another lead's mission is dropped from the store "
        "and no longer renewed (default 30 days).",
    )  # fmt: skip
    # --- serving layers (the server role) ----------------------------------------------------------
    serve: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models whose layers this peer serves: REF (the layers the swarm needs most) or REF:START-END "
        "(a fixed half-open range, e.g. builtin:smollm2-135m:0-15).",
    )
    serve_blocks: int | None = Field(
        None, ge=1, le=1024, description="Layers to serve when no range is given (default: the whole model)."
    )
    max_sessions: int = Field(16, ge=1, le=4096, description="Generation sessions a server holds at once.")
    max_session_tokens: int = Field(
        4096, ge=16, le=1 << 20, description="Tokens (prompt + answer) one session may hold on a server."
    )
    session_idle_timeout: float = Field(
        120.0, ge=1.0, le=86400.0, description="Seconds after which a server drops a session nobody used."
    )
    inference_timeout: float = Field(
        20.0, gt=0, le=600, description="Seconds one call to a layer server may take before generation routes "
        "around that server.",
    )  # fmt: skip
    spot_check: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of generation steps that this peer also runs on a second "
        "server of the same layers to compare their hidden states (0 = off, 1 = every step); a server outvoted "
        "by a third is banned. Costs the servers about that fraction more work, plus replays of the history.",
    )  # fmt: skip
    server_push: bool = Field(
        True, description="Decoding steps go from server to server along the chain (each sends its output on to "
        "the next), not back to this peer between servers. Off while spot checks are on.",
    )  # fmt: skip
    log_level: LogLevel = Field("info", description="debug, info, warning or error.")

    @model_validator(mode="before")
    @classmethod
    def _expand_invites(cls, data: Any) -> Any:
        """An invite line in ``join`` becomes its bootstrap addresses, its swarm and its leads to trust; a
        ``swarm`` set otherwise must be the same."""
        if not isinstance(data, dict) or not data.get("join"):
            return data
        items = data["join"].split(",") if isinstance(data["join"], str) else list(data["join"])
        invites = [parse_invite(item) for item in items if isinstance(item, str) and is_invite(item)]
        if not invites:
            return data
        swarms = {invite.swarm for invite in invites} | ({data["swarm"]} if data.get("swarm") else set())
        if len(swarms) > 1:
            raise ValueError(f"the invite is for swarm {invites[0].swarm!r}, but this peer is set to join "
                             f"{sorted(swarms - {invites[0].swarm})[0]!r} (--swarm): drop one")  # fmt: skip
        trusted = data.get("trust_lead") or []
        trusted = trusted.split(",") if isinstance(trusted, str) else list(trusted)
        plain = [item for item in items if not (isinstance(item, str) and is_invite(item))]
        return {
            **data,
            "join": plain + [peer for invite in invites for peer in invite.peers],
            "swarm": invites[0].swarm,
            "trust_lead": trusted + [lead for invite in invites for lead in invite.leads],
        }

    @field_validator(
        "join", "host_maddr", "announce_maddr", "roles", "serve", "http_allowed_host", "trust_lead", "relay",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trust_lead")
    @classmethod
    def _peer_ids(cls, value: list[str]) -> list[str]:
        for peer_id in value:
            if not re.fullmatch(PEER_ID, peer_id):
                raise ValueError(f"{peer_id!r} is not a peer id (as `garden status` prints it: 12D3Koo... or Qm...)")
        return sorted(set(value))

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(set(value))

    @field_validator("serve")
    @classmethod
    def _valid_serve(cls, value: list[str]) -> list[str]:
        from garden.protocol.serve_spec import parse_serve_spec

        for item in value:
            parse_serve_spec(item)  # raises ValueError naming the problem
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("swarm")
    @classmethod
    def _valid_swarm(cls, value: str) -> str:
        DHTKeys(value)  # raises ValueError naming the rule
        return value

    @field_validator("relay")
    @classmethod
    def _relay_maddrs(cls, value: list[str]) -> list[str]:
        for maddr in value:
            if not re.fullmatch(PEER_MADDR, maddr) or "/p2p-circuit" in maddr:
                raise ValueError(f"{maddr!r} is not a relay's address (/ip4/IP/tcp/PORT/p2p/PEER_ID)")
        return value

    @model_validator(mode="after")
    def _private_needs_peers(self) -> GardenSettings:
        if self.reachability == "private" and not (self.join or self.relay):
            raise ValueError(
                "a private peer is reached only through a relay, so a new swarm started by one could never be "
                "joined: give --join (a peer of the swarm to enter) or drop --reachability private"
            )
        return self

    @model_validator(mode="after")
    def _client_mode_needs_peers(self) -> GardenSettings:
        if self.client_mode and not self.join:
            raise ValueError(
                "client mode accepts no incoming connections, so a new swarm started in it could never be "
                "joined: give --join (a peer of the swarm to enter) or drop --client-mode"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls)


_FILE_VALUES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("garden_config_file", default=None)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML file's values, read by ``load_settings`` (so that it can report TOML errors by file)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_VALUES.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get() or {})


def resolve_config_file(explicit: Path | None) -> Path | None:
    """``--config`` or ``$GARDEN_CONFIG`` (must exist), else the platform default (if it exists)."""
    chosen = explicit or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if chosen is not None:
        chosen = chosen.expanduser()
        if not chosen.is_file():
            raise ConfigError(f"config file {chosen} does not exist")
        return chosen
    default = default_config_file()
    return default if default.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    known = set(GardenSettings.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return data


def load_settings(flags: Mapping[str, Any] | None = None, config_file: Path | None = None) -> GardenSettings:
    """Build the settings; ``flags`` holds only the options given on the command line (None = not given)."""
    path = resolve_config_file(config_file)
    token = _FILE_VALUES.set(read_config_file(path) if path else {})
    try:
        given = {name: value for name, value in (flags or {}).items() if value is not None}
        return GardenSettings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    finally:
        _FILE_VALUES.reset(token)
