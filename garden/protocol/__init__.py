"""Wire and DHT formats: key names, record schemas, validators. Imports nothing else of garden."""

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
