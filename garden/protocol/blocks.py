"""Served layer ranges under ``<swarm>/model/<model ref>/blocks`` (docs/architecture.md, "DHT keys").

A peer with the ``server`` role announces, for each model it serves, a :class:`BlocksRecord`: which
decoder layers it holds (``[start, end)``), how fast it runs them, how much KV cache it has left, and its
session caps. The subkey is the server's peer id and the record is sealed with its key, so no peer can
announce a range in another's name; the record lives two announce periods, so a dead server drops out of
routing on its own.

The key names the model by its reference (``builtin:smollm2-135m``, a hub id): peers that name the same
reference load the same weights. ``num_layers`` and ``hidden_size`` let a client refuse a server whose
model is not the one it has (a local path that means different files on two machines).

The same record is also stored under ``<swarm>/models`` (subkey ``"<peer id> <model ref>"``): the one key
that lists every model the swarm serves, for ``GET /v1/models``.
"""

from __future__ import annotations

from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, model_validator

from garden.protocol.records import RecordError, StrictRecord, decode_record, open_sealed, seal
from garden.protocol.shards import PeerId

BLOCKS_RECORD_VERSION = 1
MAX_BLOCKS_RECORD_BYTES = 4096
MAX_LAYERS = 1024
MAX_MODEL_REF_CHARS = 256


class BlocksRecord(StrictRecord):
    """One server's announcement of one model's layer range."""

    v: int = Field(default=BLOCKS_RECORD_VERSION, ge=1)
    peer_id: PeerId
    model: str = Field(min_length=1, max_length=MAX_MODEL_REF_CHARS)
    start: int = Field(ge=0, lt=MAX_LAYERS)
    end: int = Field(gt=0, le=MAX_LAYERS)
    num_layers: int = Field(gt=0, le=MAX_LAYERS, description="the model's layer count")
    hidden_size: int = Field(gt=0, le=1 << 16)
    throughput: float = Field(gt=0.0, le=1e9, description="layer-tokens per second, one token at a time")
    free_cache_tokens: int = Field(ge=0, le=1 << 40)
    max_sessions: int = Field(ge=1, le=1 << 20)
    max_session_tokens: int = Field(ge=1, le=1 << 24)
    wire_dtype: str = Field(default="float16", pattern="^(float16|bfloat16|float32)$")
    announced_at: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _range(self) -> BlocksRecord:
        if not self.start < self.end <= self.num_layers:
            raise ValueError(f"range {self.start}-{self.end} is not within 0-{self.num_layers}")
        return self

    def to_wire(self, private_key: rsa.RSAPrivateKey) -> bytes:
        return seal(msgpack.packb(self.model_dump(mode="python"), use_bin_type=True), private_key)

    @classmethod
    def from_wire(cls, raw: Any, subkey: Any, index: bool = False) -> BlocksRecord:
        """Decode and verify a value read under a model's blocks key (subkey: the peer id) or, with ``index``,
        under ``<swarm>/models`` (subkey: :func:`models_subkey`); ``RecordError`` with the reason."""
        body, signer = open_sealed(raw, max_bytes=MAX_BLOCKS_RECORD_BYTES)
        record = decode_record(cls, body, "blocks record")
        if signer != record.peer_id:
            raise RecordError(f"signed by {signer}, names peer {record.peer_id}")
        expected = models_subkey(record) if index else record.peer_id
        if subkey != expected:
            raise RecordError(f"stored under {str(subkey)[:80]!r}, belongs under {expected[:80]!r}")
        return record


def models_subkey(record: BlocksRecord) -> str:
    """A record's subkey under ``<swarm>/models``: one per (server, model)."""
    return f"{record.peer_id} {record.model}"
