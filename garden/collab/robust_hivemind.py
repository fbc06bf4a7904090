"""Robust averaging inside hivemind's objects: the work that :mod:`garden.collab.hivemind_patches` plugs into
hivemind's reducer, progress tracker and state download, by the rules of :mod:`garden.collab.robust`.

- :class:`HeldParts` stands in for a reducer's running sum: it holds the senders' parts of one part index and
  reduces them by CenteredClip with bounded weights once all arrived;
- :func:`credible_progress` leaves the claims of an epoch too far ahead out of hivemind's progress record;
- :func:`agreed_state` picks the state a joining peer loads: from peers whose epoch is credible, checked against a
  second peer's parameters;
- :class:`RecentClaims` remembers the claims of the last reads of a DHT record, until they expire (a read can miss
  entries, and the others' median must not depend on it);
- :func:`refute` marks a trainer that served a state with non-finite values: its progress entry is left out from
  then on, whatever it claims (else, once the honest trainers that could outvote it left, a peer that fell behind
  would follow its epoch for good, refusing every state it offers).

Nothing here replaces hivemind's attributes (only ``hivemind_patches`` does, fenced by the hivemind release);
these run inside hivemind's averager processes and tracker thread, and log what they refuse.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)
MAX_REFUTED = 1024
SERVED_BY = "garden_served_by"
"""The key of a downloaded state's metadata that names the peer that served it (:func:`agreed_state`)."""
_refuted: dict[str, str] = {}  # trainer (base58 peer id) -> why, in the trainer's own process


def refute(peer: str, why: str) -> None:
    """Leave ``peer``'s progress entries out of this process's reads from now on (:func:`credible_progress`)."""
    if peer not in _refuted and len(_refuted) < MAX_REFUTED:
        _refuted[peer] = why
        logger.warning("trainer %s %s: its progress (epoch, samples) is ignored from now on", peer, why)


def refuted(peer: str) -> str | None:
    """Why ``peer`` was refuted (:func:`refute`), or None."""
    return _refuted.get(peer)


class HeldParts:
    """Stands in for ``TensorPartReducer.accumulator`` (hivemind's running sum of the senders' parts times their
    weights): holds each sender's part and weight for the current part index, and reduces them with
    :func:`garden.collab.robust.centered_clip` when hivemind divides the sum by the total weight, which it does
    once every sender still in the round sent its part."""

    def __init__(self, reducer: Any) -> None:
        self.reducer = reducer
        self.parts: list[Any] = []
        self.weights: list[float] = []
        self.senders: list[int | None] = []

    def add_(self, part: Any, alpha: float = 1.0) -> HeldParts:
        self.parts.append(part)
        self.weights.append(float(alpha))
        self.senders.append(getattr(part, "_garden_sender", None))
        return self

    def div_(self, denominator: float) -> Any:
        import torch

        from garden.collab import robust

        reducer = self.reducer
        shape = reducer.part_shapes[reducer.current_part_index]
        if not self.parts:  # every sender left before this part: as hivemind (nobody receives it)
            return torch.zeros(shape).div_(denominator)
        own = getattr(reducer, "garden_own", None)
        mine = self.senders.index(own) if own is not None and own in self.senders else None
        reduced = robust.centered_clip(self.parts, self.weights, mine)
        self._note(reduced)
        return reduced.value.reshape(shape)

    def _note(self, reduced: Any) -> None:
        """Log, once per round and sender, a part that was clipped or a weight that was bounded."""
        from garden.collab import robust

        if not reduced.clipped and not reduced.bounded and not reduced.dropped:
            return
        names = getattr(self.reducer, "garden_senders", None) or []
        noted = self.reducer.__dict__.setdefault("_garden_noted", set())
        bounds = robust.bound_weights(self.weights)
        for kind, indices in (("clipped", reduced.clipped), ("bounded", reduced.bounded), ("dropped", reduced.dropped)):
            for i in indices:
                sender = self.senders[i]
                if (kind, sender) in noted:
                    continue
                noted.add((kind, sender))
                peer = names[sender] if sender is not None and sender < len(names) else "?"
                if kind == "clipped":
                    logger.info("averaging: clipped the part from peer %s (farther than %.3g from the round's centre)",
                                peer, reduced.radius)  # fmt: skip
                elif kind == "dropped":
                    logger.warning("averaging: left out the part from peer %s (more than %g times as far from the "
                                   "round's median as the median sender's)", peer, robust.DROP_RADIUS)  # fmt: skip
                else:
                    logger.info("averaging: peer %s claimed weight %.3g, counted as %.3g (at most %g x the round's "
                                "median weight)", peer, self.weights[i], bounds[i], robust.WEIGHT_RATIO)  # fmt: skip


class RecentClaims:
    """The latest epoch each claimant claimed in a DHT record, kept until its entry expires. A DHT read can miss
    entries: a swarm of two honest trainers and a liar then looks like one honest trainer and the liar, whose claim
    would stand alone. With the claims of the last reads, the others' median is the same from one read to the
    next. An entry removed by its owner (a goodbye: value None) is forgotten."""

    def __init__(self) -> None:
        self.claims: dict[Any, tuple[float, float]] = {}  # claimant -> (epoch, expiration time)

    def note(self, claimant: Any, epoch: float | None, expiration_time: float) -> None:
        if epoch is None:
            self.claims.pop(claimant, None)
        else:
            self.claims[claimant] = (epoch, expiration_time)

    def votes(self, now: float, exclude: Any = None) -> list[float]:
        """The claims not expired at ``now`` (DHT time), but ``exclude``'s."""
        self.claims = {k: c for k, c in self.claims.items() if c[1] > now}
        return [epoch for k, (epoch, _) in self.claims.items() if k != exclude]


def credible_progress(tracker: Any, metadata: dict[Any, Any]) -> dict[Any, Any]:
    """hivemind's progress record (``{public key: ValueWithExpiration(LocalTrainingProgress as a dict)}``) without
    the entries that claim an epoch above :func:`garden.collab.robust.epoch_ceiling` (from the other trainers'
    claims, in this read and the last ones (:class:`RecentClaims`), and this peer's epoch), without those of trainers
    refuted (:func:`refute`), and without entries that are not valid progress (hivemind would raise on them); each
    ignored claim is logged once."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.utils import get_dht_time

    from garden.collab import robust

    recent: RecentClaims = tracker.__dict__.setdefault("_garden_recent", RecentClaims())
    claims: dict[Any, Any] = {}
    for key, item in metadata.items():
        value = getattr(item, "value", None)
        if value is None:
            recent.note(key, None, 0.0)
            continue
        try:
            claims[key] = LocalTrainingProgress.parse_obj(value)
        except Exception:  # not progress at all: left out
            claims[key] = None
            continue
        if _refuted and refuted(_peer_name(claims[key].peer_id)):
            claims[key] = None
            recent.note(key, None, 0.0)
            continue
        if not claims[key].client_mode:
            recent.note(key, claims[key].epoch, float(getattr(item, "expiration_time", 0.0)))
    votes = recent.votes(get_dht_time(), exclude=tracker._local_public_key)
    ceiling = robust.epoch_ceiling(votes, own=tracker.local_progress.epoch)
    ignored = {k for k, c in claims.items() if c is None or c.epoch > ceiling}
    noted = tracker.__dict__.setdefault("_garden_ignored", set())
    for key in ignored:
        claim = claims[key]
        if claim is not None and (key, claim.epoch) not in noted:
            noted.add((key, claim.epoch))
            logger.warning("ignored the epoch %d claimed by trainer %s: the other trainers are at most at %g",
                           claim.epoch, _peer_name(claim.peer_id), ceiling - robust.EPOCH_MARGIN)  # fmt: skip
    return {k: v for k, v in metadata.items() if k not in ignored}


def _peer_name(peer_id: Any) -> str:
    from hivemind.p2p import PeerID

    try:
        return str(PeerID(peer_id).to_base58())
    except Exception:  # a malformed id: say so rather than fail
        return repr(peer_id)[:60]


async def agreed_state(averager: Any, timeout: float | None) -> tuple[Any, list[Any]] | None:
    """garden's ``DecentralizedAverager._load_state_from_peers`` (in the averager's process): the state to load,
    ``(metadata, tensors)``, or None.

    The peers that offer a state (hivemind's ``<prefix>.all_averagers`` record: peer -> priority, its epoch in
    hivemind's optimizer) are asked in hivemind's order (highest priority first, ties in random order), except those
    whose priority is above :func:`garden.collab.robust.epoch_ceiling` (of the offers of this read and the last
    ones, :class:`RecentClaims`); a state labelled with an epoch above it is refused too. The first state served is
    loaded once a second peer's parameters (downloaded alone: the first tensors of the stream) agree with it
    (:func:`garden.collab.robust.states_agree`, epochs within ``EPOCH_MARGIN``); when they disagree, a third peer
    decides, and so on. A state no other peer served is loaded
    (with a warning when others were asked); states that all disagree are not (hivemind asks again later). States of
    averagers other than a ``TrainingStateAverager`` (no parameters to compare) are not compared."""
    import random

    from hivemind.p2p import PeerID
    from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

    from garden.collab import robust

    found = averager.dht.get(f"{averager._matchmaking.group_key_manager.prefix}.all_averagers", latest=True)
    recent: RecentClaims = averager.__dict__.setdefault("_garden_recent", RecentClaims())
    offers: dict[Any, float] = {}
    for key, item in found.value.items() if found is not None and isinstance(found.value, dict) else ():
        if not isinstance(item, ValueWithExpiration):
            continue
        try:
            peer = PeerID(key)
        except Exception:  # a malformed id: not a peer to ask
            continue
        value = item.value
        if isinstance(value, int | float) and math.isfinite(value):
            offers[peer] = float(value)
            recent.note(peer, float(value), item.expiration_time)
        else:
            recent.note(peer, None, 0.0)  # it stopped sharing (or never offered a number)
    offers.pop(averager.peer_id, None)
    votes = recent.votes(get_dht_time(), exclude=averager.peer_id)
    ceiling = robust.epoch_ceiling(votes, own=averager.state_sharing_priority)
    for peer, claimed in offers.items():
        if claimed > ceiling:
            logger.warning("not asking peer %s for its state: it claims epoch %g, the other peers at most %g", peer,
                           claimed, ceiling - robust.EPOCH_MARGIN)  # fmt: skip
    candidates = sorted((p for p in offers if offers[p] <= ceiling), key=lambda p: (offers[p], random.random()),
                        reverse=True)  # fmt: skip
    compared = _compared_tensors(averager)
    first: tuple[Any, Any, list[Any]] | None = None  # (peer, metadata, tensors): loaded once another agrees
    heard: list[tuple[Any, Any, list[Any]]] = []  # (peer, metadata, parameters) of every state served
    for peer in candidates:
        served = await _download_state(averager, peer, timeout, None if first is None else compared)
        if served is None:
            continue
        metadata, tensors = served
        epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
        if isinstance(epoch, int | float) and epoch > ceiling:
            logger.warning("refused the state of peer %s: labelled epoch %s, the other peers at most %g", peer, epoch,
                           ceiling - robust.EPOCH_MARGIN)  # fmt: skip
            continue
        if compared is None:
            return _served_by(peer, metadata), tensors
        params = tensors[:compared]
        if len(params) < compared:
            logger.warning("refused the state of peer %s: %d tensors, expected %d or more", peer, len(params), compared)
            continue
        for other, other_metadata, other_params in heard:
            if _epochs_agree(metadata, other_metadata) and robust.states_agree(params, other_params):
                if first is not None and first[0] in (peer, other):
                    logger.info("the state of peer %s agrees with peer %s's: loading it", first[0],
                                peer if first[0] == other else other)  # fmt: skip
                    return _served_by(first[0], first[1]), first[2]
                whole = await _download_state(averager, peer, timeout)  # the first one disagreed with both
                if (
                    whole is not None
                    and _epochs_agree(whole[0], other_metadata)
                    and robust.states_agree(whole[1][:compared], other_params)
                ):
                    logger.info("the states of peers %s and %s agree: loading %s's", peer, other, peer)
                    return _served_by(peer, whole[0]), whole[1]
        heard.append((peer, metadata, params))
        if first is None:
            first = (peer, metadata, tensors)
    if first is not None and len(heard) == 1:
        if len(candidates) > 1:
            logger.warning("loading the state of peer %s unchecked: no other peer served one", first[0])
        else:
            logger.info("loading the state of peer %s, the only peer that offers one", first[0])
        return _served_by(first[0], first[1]), first[2]
    if heard:
        logger.warning("not loading a state: the states of peers %s disagree", ", ".join(str(p) for p, _, _ in heard))
    return None


def _served_by(peer: Any, metadata: Any) -> Any:
    """The state's metadata naming the peer that served it (``garden_served_by``): the trainer's process, which
    checks the tensors (``hivemind_patches``), refutes that peer when they are not finite."""
    return {**metadata, SERVED_BY: str(peer)} if isinstance(metadata, dict) else metadata


def _epochs_agree(mine: Any, theirs: Any) -> bool:
    from garden.collab import robust

    a = mine.get("epoch") if isinstance(mine, dict) else None
    b = theirs.get("epoch") if isinstance(theirs, dict) else None
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return a is None and b is None
    return abs(a - b) <= robust.EPOCH_MARGIN


def _compared_tensors(averager: Any) -> int | None:
    """How many tensors at the head of a served state are parameters (and extra tensors) to compare between peers:
    those of a ``TrainingStateAverager``; None for other averagers."""
    optimizer, extras = getattr(averager, "optimizer", None), getattr(averager, "extra_tensors", None)
    if optimizer is None or extras is None:
        return None
    return sum(len(group["params"]) for group in optimizer.param_groups) + len(extras)


async def _download_state(averager: Any, peer: Any, timeout: float | None, limit: int | None = None) -> Any:
    """The state ``peer`` serves, ``(metadata, tensors)`` (only the first ``limit`` tensors when given: the rest of
    the stream is not read), or None when it serves none or the download fails. As hivemind's own download."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import aiter_with_timeout
    from hivemind.utils.streaming import combine_from_streaming

    metadata, tensors, parts = None, [], []
    logger.info("downloading the state of peer %s%s", peer, "" if limit is None else f" (its first {limit} tensors)")
    try:
        stub = averager.get_stub(averager._p2p, peer, namespace=averager.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        try:
            async for message in aiter_with_timeout(stream, timeout=timeout):
                if message.metadata:
                    metadata = averager.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:  # a new tensor begins
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                    if limit is not None and len(tensors) >= limit:
                        break
                parts.append(message.tensor_part)
            else:
                if parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
    except Exception as e:
        logger.warning("could not download the state of peer %s: %r", peer, e)
        return None
    if not metadata:
        logger.debug("peer %s did not send its state", peer)
        return None
    return metadata, tensors
