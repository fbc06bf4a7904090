"""The missions this peer knows: lead-signed records read from and renewed in the DHT, their prompts fetched
from the peers that hold them, the lead's cancels, and the announcements of who holds what.

Everything read here came from strangers, so every mission is verified (:meth:`SignedMission.from_record`),
every prompt list checked against the hash the lead signed, and every announcement against its signer;
invalid entries are logged, counted and ignored. What this peer has verified is kept in the store, so a
restart (or a swarm where the lead has left) loses nothing.

Key layout (docs/architecture.md, "DHT keys"): under ``missions`` the subkey is the mission id (value: the
signed mission, renewed by every peer that holds it) or ``cancel:<id>:<lead peer id>`` (the lead's signed cancel); under
``missions/heads`` each lead's :class:`~garden.protocol.mission.IndexHead` (a digest of its entries: the whole index
is read only when one changed); under ``m/<id>/rows`` the subkey ``rows:<peer id>`` holds that peer's
:class:`RowsAnnouncement`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.net.swarm import Swarm
from garden.errors import Conflict, NotAllowed, NotFound
from garden.lifecycle import Service
from garden.net.transfer import ContentTransfer, TransferError
from garden.protocol.content import ContentRef
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import (
    CANCEL_PREFIX,
    CancelRecord,
    MissionDraft,
    SignedMission,
    cancel_subkey,
    open_cancel,
    open_index_head,
    pack_prompts,
    parse_cancel_subkey,
    shard_prompts,
    sign_cancel,
    sign_index_head,
    sign_mission,
    unpack_prompts,
)
from garden.models.loading import stranger_ref_problem
from garden.protocol.records import MAX_RECORD_TTL, RecordError
from garden.protocol.row_sets import MAX_HELD_PER_ANNOUNCEMENT, HeldRowSet, RowsAnnouncement, pack_encoded_rows
from garden.protocol.rows import PromptRow
from garden.store import Store

logger = logging.getLogger(__name__)

REFRESH_PERIOD = 5.0
"""Longest wait between reads of the ``missions/heads`` key (and of ``missions`` when a head changed): a new
mission or cancel reaches every peer within it."""
NUDGE_TOPIC = "missions"
"""The topic (``garden.net.nudge``) a lead nudges its peers about after it stored a new mission or a cancel: they
read the heads at once (:meth:`MissionBook.look`)."""
INDEX_FULL_READ_PERIOD = 60.0
"""Longest wait between whole reads of ``missions`` while no lead's head changes: the net for a head lost or
late in the DHT, and for the missions of leads that left (renewed by others, they change no more)."""
MISSION_RECORD_TTL = 2 * 3600.0
"""Seconds a mission record lives in the DHT unless renewed; every peer holding it renews it."""
MISSION_RENEW_PERIOD = 300.0
"""Seconds between this peer's renewals of a mission record it holds (and of its cancel), or its announce period if
longer. A store of one subkey costs about the whole index's size: hivemind's store finds the key's nearest nodes
with find requests, and each answers with the key's value (170 KB for 100 missions). So a record that lives 2 h
is renewed every few minutes, not every period (benchmarks/scale.py, docs/architecture.md "At swarm size")."""


CANCEL_KEEP = 24 * 3600.0
"""Seconds a cancelled mission of another lead is kept (and its cancel renewed) before it is dropped."""


@dataclass(frozen=True)
class MissionPolicy:
    """Which missions this peer keeps and works on: the swarm is open, and a mission costs every peer that
    keeps it (storage, renewals, a trainer process), so strangers' missions are bounded.

    :param trusted_leads: peer ids whose missions this peer works on; empty: every lead (missions of other
        leads are still listed, marked untrusted)
    :param max_open_per_lead: open (not cancelled) missions kept per lead; a lead's later ones are ignored
    :param max_age: seconds after its creation that another lead's mission is dropped (store and renewals)
    :param local_models_from_trusted: missions of ``trusted_leads`` (only those: never "every lead") may name
        model paths on this machine
    """

    trusted_leads: frozenset[str] = frozenset()
    local_models_from_trusted: bool = False
    max_open_per_lead: int = 4
    max_age: float = 30 * 24 * 3600.0


@dataclass
class Mission:
    """A verified mission as this peer knows it."""

    signed: SignedMission
    prompts: tuple[PromptRow, ...] | None = None
    cancel: CancelRecord | None = None

    @property
    def id(self) -> str:
        return self.signed.mission_id

    @property
    def name(self) -> str:
        return self.signed.name

    @property
    def shard_count(self) -> int:
        return self.signed.body.shard_count

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None

    def shard(self, index: int) -> list[PromptRow]:
        """The prompts of shard ``index`` (the prompts must be known)."""
        if self.prompts is None:
            raise Conflict(f"mission {self.id[:12]}: prompts not fetched yet")
        return shard_prompts(self.prompts, self.signed.spec.shard_size)[index]


class MissionBook(Service):
    """Missions known to this peer, kept in step with the DHT by :meth:`run`.

    :param period: seconds between refreshes (new missions, cancels, prompts) and renewals of what this
        peer holds; the daemon passes its announce period
    :param transfer: where it fetches prompts from peers, and serves its prompts and row sets (it registers
        both kinds)
    """

    name = "missions"

    def __init__(
        self,
        store: Store,
        swarm: Swarm,
        keys: DHTKeys,
        private_key: rsa.RSAPrivateKey,
        peer_id: str,
        period: float,
        transfer: ContentTransfer,
        policy: MissionPolicy = MissionPolicy(),
    ):
        self.store, self.swarm, self.keys = store, swarm, keys
        self._private_key, self.peer_id, self.period = private_key, peer_id, period
        self.policy = policy
        self.ignored: dict[str, str] = {}  # mission id -> why it is not kept now: over its lead's cap, too old
        self._ignored_ids: set[str] = set()  # too old, or dropped: not kept again
        self._logged_ids: set[str] = set()  # missions whose refusal was logged, once each
        self._capped: dict[str, SignedMission] = {}  # verified missions over their lead's cap, looked at again
        self._ref_problems: dict[str, str | None] = {}  # mission -> why its model references are not usable here
        self.transfer = transfer
        transfer.register("prompts", self.content)
        transfer.register("rows", self.content)
        self.missions: dict[str, Mission] = {}
        self.invalid_records: Counter[str] = Counter()  # by kind: mission, cancel, prompts, rows, head
        self.index_reads: Counter[str] = Counter()  # reads of the mission index: "heads" and "full"
        self._heads_seen: dict[str, str] | None = None  # lead -> digest, as at the last whole read
        self._full_read_at = -float("inf")  # time.monotonic() of the last whole read
        self._read_again = False  # a head changed at the last whole read: read once more (a store in flight)
        self._renewed: dict[str, tuple[float, bool]] = {}  # mission id -> (monotonic time, with its cancel) stored
        self._wake = asyncio.Event()
        self._look = asyncio.Event()  # read the index now (another peer nudged: it changed its head)
        self.news = asyncio.Event()
        """Set when a mission becomes known, gets its prompts or is cancelled: the work loop reacts at once."""
        self.on_change: Callable[[], Awaitable[Any]] | None = None
        """Called (in a task of its own) once this peer, as a lead, stored a new mission or a cancel and its head:
        the daemon nudges the peers it knows (``garden.net.nudge``), so they look at once, not at their period."""
        self._telling: set[asyncio.Task[Any]] = set()
        self._load()

    # --- local state --------------------------------------------------------------------------------
    def _load(self) -> None:
        """Missions kept in the store, verified again (the store is ours, but a bug must not spread)."""
        for kept in self.store.list_missions():
            try:
                signed = SignedMission.from_wire(kept.record)
                mission = Mission(signed)
                if kept.prompts is not None:
                    mission.prompts = unpack_prompts(kept.prompts, signed)
                if kept.cancel is not None:
                    mission.cancel = open_cancel(kept.cancel, signed)
            except RecordError as e:
                logger.error("stored mission %s is unreadable, ignored: %s", kept.mission_id[:12], e)
                continue
            self.missions[signed.mission_id] = mission

    def newest_first(self) -> list[Mission]:
        """Every mission this peer knows, the newest (by its signed creation time) first."""
        return sorted(self.missions.values(), key=lambda m: m.signed.body.created, reverse=True)

    def get(self, mission_id: str) -> Mission:
        mission = self.missions.get(mission_id)
        if mission is None:
            raise NotFound(f"no mission {mission_id!r} is known to this peer")
        return mission

    # --- the policy ------------------------------------------------------------------------------------
    def leads_here(self, mission: Mission) -> bool:
        return mission.signed.lead_peer_id == self.peer_id

    def trusted(self, mission: Mission) -> bool:
        """Whether this peer works on missions of the mission's lead (``--trust-lead``; every lead without it)."""
        trusted = self.policy.trusted_leads
        return not trusted or self.leads_here(mission) or mission.signed.lead_peer_id in trusted

    def refusal(self, mission: Mission) -> str | None:
        """Why this peer does not work on ``mission`` (shake, train, copy its rows); None when it does."""
        if not self.trusted(mission):
            return f"its lead {mission.signed.lead_peer_id} is not one this peer trusts (--trust-lead)"
        if self.leads_here(mission):
            return None
        if self.policy.local_models_from_trusted and mission.signed.lead_peer_id in self.policy.trusted_leads:
            return None
        if mission.id not in self._ref_problems:  # a mission's references never change: looked at once
            spec = mission.signed.spec
            grader = getattr(spec.judge, "model", None)
            refs = [*spec.teachers, spec.student.base, *([grader] if grader else [])]
            self._ref_problems[mission.id] = next(filter(None, map(stranger_ref_problem, refs)), None)
        return self._ref_problems[mission.id]

    def _open_missions_of(self, lead: str) -> int:
        return sum(1 for m in self.missions.values() if m.signed.lead_peer_id == lead and not m.cancelled)

    def _admits(self, signed: SignedMission, cancelled: bool = False) -> bool:
        """Whether to keep another lead's new mission: not past its age, and, unless it comes with its
        lead's cancel (it is not open then), not past its lead's cap. A mission over the cap is looked at
        again at every refresh (a cancel of the lead's may make room); one too old never is."""
        lead, mission_id = signed.lead_peer_id, signed.mission_id
        if lead == self.peer_id:
            return True
        if mission_id in self._ignored_ids:
            return False
        if signed.body.created < time.time() - self.policy.max_age:
            reason = "too old"
            self._ignored_ids.add(mission_id)
            self._capped.pop(mission_id, None)
        elif not cancelled and self._open_missions_of(lead) >= self.policy.max_open_per_lead:
            reason = "over its lead's cap"
        else:
            self.ignored.pop(mission_id, None)
            self._capped.pop(mission_id, None)
            return True
        self.ignored[mission_id] = reason
        if reason == "over its lead's cap":
            self._capped[mission_id] = signed
        if mission_id not in self._logged_ids:
            self._logged_ids.add(mission_id)
            logger.warning(
                "mission %s (%s) by %s is not kept: %s (at most %d open missions per lead, %.0f days old)",
                signed.name, mission_id[:12], lead, reason, self.policy.max_open_per_lead, self.policy.max_age / 86400,
            )  # fmt: skip
        return False

    async def sweep(self, now: float | None = None) -> list[str]:
        """Drop other leads' missions past their end (older than ``max_age``, or cancelled over
        ``CANCEL_KEEP`` ago) from memory and the store, rows included: they are not renewed any more. Returns
        the ids dropped."""
        now = time.time() if now is None else now
        dropped = []
        for mission in list(self.missions.values()):
            if self.leads_here(mission):
                continue
            old = mission.signed.body.created < now - self.policy.max_age
            ended = mission.cancel is not None and mission.cancel.cancelled_at < now - CANCEL_KEEP
            if old or ended:
                del self.missions[mission.id]  # first: nothing starts on it while its rows go
                self._renewed.pop(mission.id, None)
                self._ignored_ids.add(mission.id)
                await asyncio.to_thread(self.store.drop_mission, mission.id)  # its rows too: many deletes
                dropped.append(mission.id)
                why = "too old" if old else "cancelled a day ago"
                logger.info("dropped mission %s (%s): %s", mission.name, mission.id[:12], why)
        return dropped

    # the store's writes run in a thread: one waits while another thread writes a row set of tens of MiB
    async def _keep(self, signed: SignedMission, cancelled: bool = False) -> Mission:
        if signed.mission_id not in self.missions:
            if not self._admits(signed, cancelled):
                raise _NotKept(signed.mission_id)
            await asyncio.to_thread(
                self.store.add_mission, signed.mission_id, signed.to_wire(), signed.name, signed.lead_peer_id
            )
            if signed.mission_id not in self.missions:  # a publish of the same mission may have come first
                self.missions[signed.mission_id] = Mission(signed)
                self.news.set()
                logger.info("mission %s (%s) by %s is known now", signed.name, signed.mission_id[:12],
                            signed.lead_peer_id)  # fmt: skip
        return self.missions[signed.mission_id]

    async def _keep_prompts(self, mission: Mission, prompts: tuple[PromptRow, ...]) -> None:
        await asyncio.to_thread(lambda: self.store.set_mission_prompts(mission.id, pack_prompts(prompts)))
        mission.prompts = prompts
        self.news.set()

    async def _keep_cancel(self, mission: Mission, raw: bytes, cancel: CancelRecord) -> None:
        if mission.cancel is None:
            await asyncio.to_thread(self.store.set_mission_cancel, mission.id, raw)
            mission.cancel = cancel
            self.news.set()
            logger.info("mission %s (%s) was cancelled by its lead", mission.name, mission.id[:12])

    def wake(self) -> None:
        """Announce soon (e.g. after storing a row set), instead of at the next period."""
        self._wake.set()

    def look(self) -> None:
        """Read the missions' heads now (a lead nudged this peer), instead of at the next refresh; announces
        nothing."""
        self._look.set()

    def _tell(self) -> None:
        if self.on_change is None:
            return
        task = asyncio.create_task(self.on_change(), name="garden-missions-nudge")
        self._telling.add(task)  # kept until done: a task nobody holds may be collected mid-flight
        task.add_done_callback(self._telling.discard)

    # --- what the lead does ---------------------------------------------------------------------------
    async def publish(self, draft: MissionDraft) -> Mission:
        """Sign ``draft`` with this peer's key (this peer becomes the lead), keep it, and publish it. A lead
        already at the cap of open missions is refused: other peers would ignore one more."""
        cap = self.policy.max_open_per_lead
        if self._open_missions_of(self.peer_id) >= cap:
            raise Conflict(
                f"this peer already leads {cap} open missions, the most other peers keep per lead "
                "(max_missions_per_lead); cancel one first"
            )
        signed = sign_mission(draft, self._private_key)
        mission = await self._keep(signed)
        await self._keep_prompts(mission, draft.prompts)
        if not await self.announce(mission) or not await self.announce_head():
            logger.warning("mission %s is kept here, but the DHT did not take it yet; retrying", signed.mission_id)
        else:
            self._tell()
        return mission

    async def cancel(self, mission_id: str, reason: str = "") -> Mission:
        mission = self.get(mission_id)
        if mission.signed.lead_peer_id != self.peer_id:
            raise NotAllowed(
                f"only the mission's lead ({mission.signed.lead_peer_id}) may cancel it; this peer is {self.peer_id}"
            )
        if mission.cancel is None:
            raw = sign_cancel(mission.id, self._private_key, reason=reason)
            await self._keep_cancel(mission, raw, open_cancel(raw, mission.signed))
        announced = await self.announce(mission)
        if await self.announce_head() and announced:  # the head is stored even when the record was not
            self._tell()
        return mission

    # --- the DHT ------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the leads' heads; when one changed (or every ``INDEX_FULL_READ_PERIOD``) read ``missions`` whole:
        keep new verified missions, obey the leads' cancels. Then fetch missing prompts."""
        heads = await self.read_heads()
        now = time.monotonic()
        changed = heads is not None and heads != self._heads_seen
        if changed or self._read_again or now - self._full_read_at >= INDEX_FULL_READ_PERIOD:
            # a read that found nothing while some lead has a head failed (the key's holders did not answer): the
            # next refresh reads again
            if await self._read_index() or not heads:
                # a changed head is followed by one more whole read: the lead stores its mission, then its head,
                # but the holders this read asked may not all have the mission yet
                self._full_read_at, self._read_again = now, changed
                if heads is not None:
                    self._heads_seen = heads
        for mission in list(self.missions.values()):
            if mission.prompts is None and self.refusal(mission) is None:  # no bytes for what it will not do
                await self.fetch_prompts(mission)

    async def read_heads(self) -> dict[str, str] | None:
        """The valid heads under ``missions/heads``: lead -> digest. None when the DHT gave nothing (no lead is
        online, or the read failed): no reason to read the whole index, which the period reads anyway."""
        found = await self.swarm.get(self.keys.mission_heads, latest=True)
        self.index_reads["heads"] += 1
        if found is None or not hasattr(found.value, "items"):
            return None
        heads: dict[str, str] = {}
        now = get_dht_time()
        for subkey, item in found.value.items():
            try:
                head = open_index_head(getattr(item, "value", None), subkey, item.expiration_time, now)
            except (RecordError, AttributeError) as e:
                self._invalid("head", f"under {str(subkey)[:80]!r}: {e}")
                continue
            heads[head.lead] = head.digest
        return heads

    async def _read_index(self) -> bool:
        """Read ``missions`` whole: keep new verified missions, obey the leads' cancels. False if the DHT gave
        nothing."""
        found = await self.swarm.get(self.keys.missions, latest=True)
        self.index_reads["full"] += 1
        entries: Mapping[Any, Any] = {}
        if found is not None and hasattr(found.value, "items"):
            entries = dict(found.value.items())
        cancels: dict[str, list[tuple[str, Any]]] = {}  # mission id -> (signer, signed cancel), any signer
        new: list[SignedMission] = []
        for subkey, item in entries.items():
            value = getattr(item, "value", None)
            if isinstance(subkey, str) and subkey.startswith(CANCEL_PREFIX):
                try:
                    mission_id, signer = parse_cancel_subkey(subkey)
                except RecordError as e:
                    self._invalid("cancel", str(e))
                    continue
                cancels.setdefault(mission_id, []).append((signer, value))
                continue
            if subkey in self.missions or subkey in self._ignored_ids:
                continue
            if subkey in self._capped:  # verified before: looked at again, not verified again
                new.append(self._capped[subkey])
                continue
            try:
                new.append(SignedMission.from_record(value, subkey))
            except RecordError as e:
                self._invalid("mission", f"under {str(subkey)[:80]!r}: {e}")
        # oldest first, so which of a lead's missions fit under its cap is the same on every peer; a mission
        # that arrives with its lead's cancel is no open mission and takes no place under the cap
        for signed in sorted(new, key=lambda m: (m.body.created, m.mission_id)):
            offered = cancels.get(signed.mission_id, ())
            by_lead = any(signer == signed.lead_peer_id and _opens(value, signed) for signer, value in offered)
            try:
                await self._keep(signed, cancelled=by_lead)
            except _NotKept:
                pass
        for mission_id, signed_cancels in cancels.items():
            for signer, value in signed_cancels:
                mission = self.missions.get(mission_id)
                if mission is None or mission.cancel is not None:
                    break
                if signer != mission.signed.lead_peer_id:
                    self._invalid("cancel", f"for {mission_id[:12]} by {signer}, who is not its lead")
                    continue
                try:
                    await self._keep_cancel(mission, value, open_cancel(value, mission.signed))
                except RecordError as e:
                    self._invalid("cancel", f"for {mission_id[:12]}: {e}")
        return found is not None

    async def holders(self, mission_id: str) -> dict[str, RowsAnnouncement]:
        """Who announces holding what of a mission (this peer included), verified; empty if the DHT is silent."""
        found = await self.swarm.get(self.keys.mission_rows(mission_id), latest=True)
        result: dict[str, RowsAnnouncement] = {}
        if found is None or not hasattr(found.value, "items"):
            return result
        for subkey, item in found.value.items():
            try:
                announcement = RowsAnnouncement.from_wire(getattr(item, "value", None), subkey)
                if announcement.mission_id != mission_id:
                    raise RecordError(f"announces mission {announcement.mission_id[:12]}")
            except RecordError as e:
                self._invalid("rows", f"under {str(subkey)[:80]!r}: {e}")
                continue
            result[announcement.peer_id] = announcement
        return result

    async def fetch_prompts(self, mission: Mission) -> bool:
        """Get the mission's prompts from a peer that announces them; True once they are here."""
        if mission.prompts is not None:
            return True
        holders = [peer for peer, a in (await self.holders(mission.id)).items() if a.has_prompts]
        if not holders:
            logger.info("no peer announces the prompts of mission %s yet", mission.id[:12])
            return False
        ref = ContentRef(kind="prompts", mission_id=mission.id, sha256=mission.signed.body.prompts_sha256)
        try:
            raw, source = await self.transfer.fetch_any(holders, ref)
            prompts = await asyncio.to_thread(unpack_prompts, raw, mission.signed)  # up to 64 MiB to decode
        except (TransferError, RecordError) as e:  # the transfer checked the hash; a decode error is a bug's
            self._invalid("prompts", f"mission {mission.id[:12]}: {e}")
            return False
        await self._keep_prompts(mission, prompts)
        logger.info("fetched the %d prompts of mission %s from %s", len(prompts), mission.id[:12], source)
        self.wake()
        return True

    async def announce(self, mission: Mission) -> bool:
        """Say what this peer holds of the mission, and renew its record (and its cancel) when
        ``MISSION_RENEW_PERIOD`` passed since this peer last stored it, or it was cancelled since. True if
        stored."""
        ok = await self._renew(mission)
        held = sorted(self.store.row_sets(mission.id), key=lambda s: (s.shard, s.attempt))
        announcement = RowsAnnouncement(
            mission_id=mission.id,
            peer_id=self.peer_id,
            has_prompts=mission.prompts is not None,
            row_sets=[
                HeldRowSet(shard=s.shard, attempt=s.attempt, producer=s.producer, sha256=s.sha256, rows=s.rows)
                for s in held[:MAX_HELD_PER_ANNOUNCEMENT]
            ],
            announced_at=get_dht_time(),
        )
        ok_rows = await self.swarm.store(
            self.keys.mission_rows(mission.id),
            announcement.to_wire(self._private_key),
            get_dht_time() + max(4 * self.period, 60.0),
            subkey=announcement.subkey,
        )
        return ok and ok_rows

    async def _renew(self, mission: Mission) -> bool:
        renewed_at, with_cancel = self._renewed.get(mission.id, (-float("inf"), False))
        now = time.monotonic()
        if now - renewed_at < max(MISSION_RENEW_PERIOD, self.period) and with_cancel == mission.cancelled:
            return True
        expiration = get_dht_time() + MISSION_RECORD_TTL
        ok = await self.swarm.store(self.keys.missions, mission.signed.to_wire(), expiration, subkey=mission.id)
        if mission.cancel is not None:
            kept = self.store.get_mission(mission.id)
            if kept is not None and kept.cancel is not None:
                subkey = cancel_subkey(mission.id, mission.signed.lead_peer_id)
                ok = await self.swarm.store(self.keys.missions, kept.cancel, expiration, subkey=subkey) and ok
        if ok:  # a store that failed is tried again at the next announce
            self._renewed[mission.id] = (now, mission.cancelled)
        return ok

    async def announce_head(self) -> bool:
        """Store this peer's head (when it leads a mission): after its mission records, so that a reader who sees
        the head change finds them. True if stored, or nothing to store."""
        led = [m for m in self.missions.values() if self.leads_here(m)]
        if not led:
            return True
        now = get_dht_time()
        raw = sign_index_head(self._private_key, [m.id for m in led], [m.id for m in led if m.cancelled], now)
        ttl = min(max(4 * self.period, 60.0), MAX_RECORD_TTL)
        return await self.swarm.store(self.keys.mission_heads, raw, now + ttl, subkey=self.peer_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Look for new missions and cancels every ``REFRESH_PERIOD`` at most (so a mission reaches every
        peer within seconds even with a long announce period), and renew what this peer holds every
        period, or sooner after :meth:`wake`."""
        refresh_period = min(self.period, REFRESH_PERIOD)
        last_announce = -float("inf")
        while not stop.is_set():
            started = time.monotonic()
            self._look.clear()
            try:
                await self.refresh()
                if await self.sweep():
                    self.news.set()
                if self._wake.is_set() or started - last_announce >= self.period:
                    self._wake.clear()
                    last_announce = started
                    for mission in list(self.missions.values()):
                        await self.announce(mission)
                    await self.announce_head()
            except Exception:  # one bad round must not end the loop; the next one retries
                logger.exception("mission refresh failed")
            await wait_any((stop, self._wake, self._look),
                           timeout=max(0.0, refresh_period - (time.monotonic() - started)))  # fmt: skip

    # --- serving content to other peers ---------------------------------------------------------------
    async def content(self, ref: ContentRef) -> bytes | None:
        """The transfer's source: this peer's prompts and row sets, rebuilt from the store."""
        mission = self.missions.get(ref.mission_id)
        if mission is None:
            return None
        if ref.kind == "prompts":
            kept = self.store.get_mission(ref.mission_id)
            return kept.prompts if kept is not None else None
        attempt = parse_row_set_item(ref.item)[1] if ref.item else ""
        bodies = await asyncio.to_thread(self.store.row_set_bodies, ref.mission_id, attempt)
        return None if bodies is None else pack_encoded_rows(bodies)

    def _invalid(self, kind: str, reason: str) -> None:
        self.invalid_records[kind] += 1
        logger.warning("ignored an invalid %s record: %s", kind, reason)


def _opens(raw: Any, signed: SignedMission) -> bool:
    """Whether ``raw`` is a valid cancel of ``signed`` by its lead."""
    try:
        open_cancel(raw, signed)
    except RecordError:
        return False
    return True


class _NotKept(Exception):
    """A mission the policy does not keep (:meth:`MissionBook._admits` said why)."""


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Until any of ``events`` is set, or ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def row_set_item(shard: int, attempt: str, producer: str) -> str:
    """``ContentRef.item`` naming a row set: ``<shard>:<attempt>:<producer>``."""
    return f"{shard}:{attempt}:{producer}"


def parse_row_set_item(item: str) -> tuple[int, str, str]:
    """Inverse of :func:`row_set_item`; ``ValueError`` for anything else."""
    parts = item.split(":")
    if len(parts) != 3 or not parts[0].isdigit():
        raise ValueError(f"not a row set name: {item[:80]!r}")
    return int(parts[0]), parts[1], parts[2]
