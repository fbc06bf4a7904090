"""hivemind record validators: the DHT node itself refuses invalid garden records.

hivemind calls ``validate`` when another peer asks this node to store a record and when a peer
returns a record to this node's search, so a forged or garbage value under a garden key is never
stored here nor handed to the daemon. Readers validate again anyway (``PeerInfo.from_wire``):
defence in depth costs one signature check per record.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import time
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from garden.protocol.checkpoints import StudentRecord
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import CANCEL_PREFIX, CancelRecord, SignedMission, open_any_cancel, open_index_head
from garden.protocol.records import (
    MAX_CLOCK_SKEW,
    MAX_RECORD_TTL,
    IncompatibleVersionError,
    PeerInfo,
    RecordError,
)
from garden.protocol.row_sets import RowsAnnouncement, is_rows_subkey
from garden.protocol.shards import decode_shard_entry, is_shard_subkey, segment_of

logger = logging.getLogger(__name__)
REPEAT_QUIET_S = 600.0
"""Seconds during which a refusal for the same reason is logged at debug level only."""


class CountingValidator(RecordValidatorBase):
    """A validator that counts what it refuses, for ``/metrics``. The counter is shared memory created
    in shared memory: whichever process runs the DHT node (the daemon's thread, a worker's DHT process) validates
    and counts, and the daemon reads."""

    what = "record"  # for the log line

    def __init__(self) -> None:
        self._rejected = multiprocessing.Value("Q", 0)
        self._logged: dict[str, float] = {}  # reason -> when it was last logged (in this process)

    @property
    def rejected(self) -> int:
        """Records refused so far (in whichever process validated them)."""
        return int(self._rejected.value)

    def _reject(self, reason: str) -> bool:
        with self._rejected.get_lock():
            self._rejected.value += 1
        # a stranger's forged record comes back with every read of its key (once a second, for a shard board):
        # the same reason is logged once per REPEAT_QUIET_S, and counted every time
        now = time.monotonic()
        if now - self._logged.get(reason, -math.inf) >= REPEAT_QUIET_S:
            if len(self._logged) >= 256:
                self._logged.clear()
            self._logged[reason] = now
            logger.info("dropped an invalid %s: %s", self.what, reason)
        else:
            logger.debug("dropped an invalid %s again: %s", self.what, reason)
        return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


@functools.lru_cache(maxsize=4096)
def key_id(key: str) -> bytes:
    """The DHT's id of a key, as ``DHTRecord.key`` holds it. Cached: every shard record of every answer is checked
    against its segment's key (a hash each, 3 % of a busy DHT host's CPU in ``benchmarks/scale.py``)."""
    return DHTID.generate(source=key).to_bytes()


class PeerRecordValidator(CountingValidator):
    """Accepts under ``<swarm>/peers`` only subkeyed values that are valid, self-signed ``PeerInfo``."""

    what = "peer record"

    def __init__(self, keys: DHTKeys):
        super().__init__()
        self._peers_key_id = key_id(keys.peers)

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._peers_key_id:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            PeerInfo.from_wire(value, subkey).check_fresh(record.expiration_time, get_dht_time())
        except IncompatibleVersionError:
            # signed by the peer it names (checked before the body): another version's record, kept for
            # the peers that speak it; readers here ignore it and tell their owner to upgrade
            return record.expiration_time <= get_dht_time() + MAX_RECORD_TTL + MAX_CLOCK_SKEW
        except RecordError as e:
            return self._reject(str(e))
        except Exception as e:  # undecodable subkey or value: a stranger's garbage, never our crash
            return self._reject(f"undecodable: {str(e)[:200]}")
        return True


class MissionRecordValidator(CountingValidator):
    """Refuses forged or garbage mission records, cancels and rows announcements inside the DHT node.

    Under ``<swarm>/missions``: subkey = mission id with a lead-signed mission that hashes to it
    (:meth:`SignedMission.from_record`), or ``cancel:<mission id>:<signer>`` with a cancel of that mission
    signed by that peer; nothing else. Whether the signer is the lead needs the mission, which readers
    check (:func:`open_cancel`); a stranger's cancel sits under its own subkey and is ignored. Under
    ``<swarm>/missions/heads``: subkey = a peer id with a fresh :class:`~garden.protocol.mission.IndexHead` signed
    by that peer. Under any
    key: a ``rows:<peer>`` subkey must hold that peer's signed
    :class:`RowsAnnouncement`, stored under its mission's rows key. Under ``<swarm>/students``: subkey =
    ``<mission id>:<peer id>`` with a :class:`StudentRecord` of that mission sealed by that peer (that it is the
    lead, readers check against the mission).
    """

    what = "mission record"

    def __init__(self, keys: DHTKeys):
        super().__init__()
        self.keys = keys
        self._missions_key_id = key_id(keys.missions)
        self._heads_key_id = key_id(keys.mission_heads)
        self._students_key_id = key_id(keys.students)

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # not ours to judge (other validators may)
            subkey = None
        is_missions = record.key == self._missions_key_id
        is_students = record.key == self._students_key_id
        is_heads = record.key == self._heads_key_id
        if not is_missions and not is_students and not is_heads and not is_rows_subkey(subkey):
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
            if is_heads:
                open_index_head(value, subkey, record.expiration_time, get_dht_time())
            elif is_students:
                StudentRecord.from_wire(value, subkey)
            elif is_missions:
                check_missions_entry(value, subkey)
            else:
                announcement = RowsAnnouncement.from_wire(value, subkey)
                if record.key != key_id(self.keys.mission_rows(announcement.mission_id)):
                    raise RecordError("a rows announcement stored under another key than its mission's")
        except RecordError as e:
            return self._reject(str(e))
        except Exception as e:  # undecodable value: a stranger's garbage, never our crash
            return self._reject(f"undecodable: {str(e)[:200]}")
        return True


def check_missions_entry(value: Any, subkey: Any) -> SignedMission | CancelRecord:
    """One entry under ``missions``, decoded and checked as far as it can be alone; ``RecordError``."""
    if isinstance(subkey, str) and subkey.startswith(CANCEL_PREFIX):
        return open_any_cancel(value, subkey)
    return SignedMission.from_record(value, subkey)


class ShardRecordValidator(CountingValidator):
    """Refuses, inside the DHT node, lease/done entries that are forged, garbage or misplaced.

    hivemind calls ``validate`` when a peer asks this node to store a record and on every record a
    search returns (a node that answers with any invalid entry has its whole answer dropped), so an
    honest node never stores nor hands out a forged lease.

    What it recognises: any subkey starting with ``lease:``, ``done:`` or ``refuted:``, under any key; the record
    must then be a valid signed record whose subkey, key (its mission's shards key for its shard's segment,
    ``<swarm>/m/<mission>/shards[/<segment>]``), shard range and times check out. What it cannot do: know which
    keys are shards keys (it sees only key hashes, and missions appear after the node started), so an
    entry under a shards key with some *other* subkey passes here and is dropped by :class:`ShardBoard`
    instead; nor check the shard count against the signed mission (``ShardBoard`` does).
    """

    what = "shard record"

    def __init__(self, keys: DHTKeys):
        super().__init__()
        self.keys = keys

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # a stranger's undecodable subkey: not ours to judge (other validators may)
            return True
        if not is_shard_subkey(subkey):
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
            decoded = decode_shard_entry(value, subkey, record.expiration_time, get_dht_time())
            if record.key != key_id(self.keys.shard_segment(decoded.mission_id, segment_of(decoded.shard))):
                raise RecordError(f"a {subkey[:80]!r} record stored under another key than its mission's segment")
        except RecordError as e:
            return self._reject(str(e))
        except Exception as e:  # undecodable value: a stranger's garbage, never our crash
            return self._reject(f"undecodable: {str(e)[:200]}")
        return True
