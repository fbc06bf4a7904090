"""Response bodies of the local HTTP port. They are a public contract for apps and scripts: add
fields freely, never rename or remove one."""

from __future__ import annotations


from pydantic import BaseModel, Field

from garden.protocol.records import GpuInfo, Role


class Health(BaseModel):
    status: str = "ok"


class Machine(BaseModel):
    cores: int
    ram_bytes: int
    gpu: GpuInfo | None = None


class Status(BaseModel):
    peer_id: str
    version: str
    uptime_s: float = Field(description="seconds since the daemon joined the swarm")
    roles: list[Role]
    skipped_roles: dict[str, str] = Field(description="roles this machine cannot take, with the reason")
    addresses: list[str] = Field(description="multiaddrs others can join through (empty in client mode)")
    peers: int = Field(description="peers seen in the swarm at the last refresh, this one included")
    joined: bool = Field(description="this peer's record has been stored in the DHT at least once")
    swarm: str
    client_mode: bool
    announce_period_s: float = Field(description="seconds between announces of this peer's record")
    machine: Machine


class Peer(BaseModel):
    peer_id: str
    version: str
    roles: list[Role]
    cores: int
    ram_bytes: int
    gpu: GpuInfo | None = None
    load: float
    addresses: list[str]
    client_mode: bool
    last_seen: float = Field(description="DHT time (unix seconds) of the peer's latest announce")
    expires_in_s: float = Field(description="seconds until the record expires unless re-announced")
    is_self: bool


class Error(BaseModel):
    detail: str
