"""Level 0: every format that crosses peers. Imports nothing else of garden (import-linter checks it).

Everything here is read from strangers, so decoding is strict and bounded: schemas reject rather than
coerce, sizes are capped, and signed records name their signer.

- ``keys``: the DHT key names, in one place, so no module spells a key by hand
- ``signing``: signatures by a peer's own libp2p identity key
- ``records``: the strict record base, msgpack encoding, the signed envelope, ``PeerInfo`` and versions
- ``validators``: hivemind record validators, so the DHT node itself refuses forged or garbage records
  (peer records, missions and cancels, row-set announcements, shard leases and done records)
- ``mission_spec`` and ``mission``: the lead's mission file, its canonical encoding and signed identity
- ``linear_regex``: the RE2 patterns a mission's regex judge may use (linear time, refused otherwise)
- ``rows``: prompt rows and DORPO rows, as shakers write them and trainers read them
- ``shards``: shard leases and done records, and which attempt wins a shard
- ``row_sets``: the rows one attempt sampled for one shard, and the announcement of who holds which
- ``checkpoints``: checkpoint manifests announced by a mission's trainers
- ``content``: content references and the framing of content transfer (fetch, offer)
- ``blocks``: served layer ranges of a model; ``serve_spec``: the ``--serve`` values
- ``inference_rpc``: the messages of the block-serving RPCs (open, forward, close)
"""

from garden.protocol.keys import DHTKeys
from garden.protocol.records import (
    PROTOCOL_VERSION,
    GpuInfo,
    PeerInfo,
    PeerState,
    RecordError,
    SignedRecord,
)

__all__ = ["DHTKeys", "GpuInfo", "PeerInfo", "PeerState", "PROTOCOL_VERSION", "RecordError", "SignedRecord"]
