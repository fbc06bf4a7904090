"""hivemind record validators: the DHT node itself refuses invalid garden records.

hivemind calls ``validate`` when another peer asks this node to store a record and when a peer
returns a record to this node's search, so a forged or garbage value under a garden key is never
stored here nor handed to the daemon. Readers validate again anyway (``PeerInfo.from_wire``):
defence in depth costs one signature check per record.
"""

from __future__ import annotations

import logging
import multiprocessing

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from garden.protocol.keys import DHTKeys
from garden.protocol.records import PeerInfo, RecordError

logger = logging.getLogger(__name__)


class PeerRecordValidator(RecordValidatorBase):
    """Accepts under ``<swarm>/peers`` only subkeyed values that are valid, self-signed ``PeerInfo``."""

    def __init__(self, keys: DHTKeys):
        self._peers_key_id = DHTID.generate(source=keys.peers).to_bytes()
        # shared memory, created before the DHT process forks: that process counts, the daemon reads
        self._rejected = multiprocessing.Value("Q", 0)

    @property
    def rejected(self) -> int:
        """Records refused so far (in whichever process validated them)."""
        return int(self._rejected.value)

    def _reject(self, reason: str) -> bool:
        with self._rejected.get_lock():
            self._rejected.value += 1
        logger.info("dropped an invalid peer record: %s", reason)
        return False

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._peers_key_id:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            PeerInfo.from_wire(value, subkey).check_fresh(record.expiration_time, get_dht_time())
        except RecordError as e:
            return self._reject(str(e))
        except Exception as e:  # undecodable subkey or value: a stranger's garbage, never our crash
            return self._reject(f"undecodable: {str(e)[:200]}")
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
