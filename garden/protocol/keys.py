"""DHT key names (docs/architecture.md, "DHT keys"). One place, so no module spells a key by hand."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SWARM = "garden"


@dataclass(frozen=True)
class DHTKeys:
    """Key names under a swarm's prefix.

    The prefix keeps two swarms apart even when they share bootstrap peers (a stock
    ``hivemind-dht`` can serve many swarms at once).

    :param swarm: the swarm's name; every key starts with ``<swarm>/``
    """

    swarm: str = DEFAULT_SWARM

    def __post_init__(self) -> None:
        if not self.swarm or "/" in self.swarm or not self.swarm.isprintable() or len(self.swarm) > 64:
            raise ValueError(f"swarm name {self.swarm!r} must be 1-64 printable characters without '/'")

    @property
    def peers(self) -> str:
        """Subkey = peer id (base58); value = a signed ``PeerInfo``."""
        return f"{self.swarm}/peers"

    def mission_shards(self, mission_id: str) -> str:
        return f"{self.swarm}/m/{mission_id}/shards"

    def shard_segment(self, mission_id: str, segment: int) -> str:
        """The key of one segment of a mission's shard records (``garden.protocol.shards.SEGMENT_SHARDS`` shards
        each); segment 0 is :meth:`mission_shards` itself."""
        if segment < 0:
            raise ValueError(f"segment {segment} < 0")
        return self.mission_shards(mission_id) + (f"/{segment}" if segment else "")

    def mission_rows(self, mission_id: str) -> str:
        return f"{self.swarm}/m/{mission_id}/rows"

    def mission_checkpoints(self, mission_id: str) -> str:
        return f"{self.swarm}/m/{mission_id}/ckpt"

    @property
    def missions(self) -> str:
        return f"{self.swarm}/missions"

    @property
    def mission_heads(self) -> str:
        """Subkey = a lead's peer id; value = its signed ``IndexHead`` (a digest of its entries under ``missions``:
        readers read the whole index only when a head changed)."""
        return f"{self.swarm}/missions/heads"

    @property
    def students(self) -> str:
        """Subkey = ``<mission id>:<publisher>``; value = its sealed ``StudentRecord`` (a mission's published student:
        the lead's counts)."""
        return f"{self.swarm}/students"

    @property
    def models(self) -> str:
        """Subkey = ``"<peer id> <model ref>"``; value = a sealed ``BlocksRecord`` (every served range)."""
        return f"{self.swarm}/models"

    def model_blocks(self, model_id: str) -> str:
        return f"{self.swarm}/model/{model_id}/blocks"
