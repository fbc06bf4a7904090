"""Content transfer between peers: chunked, size-capped, hash-verified fetches over hivemind's P2P.

A peer fetches what another peer holds: a mission's prompt list, or a row set (the rows one attempt sampled
for one shard). The fetcher always knows the content's sha256 beforehand, from a record someone signed, so
this layer is generic: it moves bytes and checks their hash, and never needs to understand them.

Wire (protocol ``<namespace>.content.fetch``, one stream per fetch; hivemind's existing protobufs, as Petals
uses them): the request is an ``ExpertRequest`` whose ``metadata`` is a msgpack :class:`ContentRef`. The
answer is a stream of ``ExpertResponse``: the first one's ``metadata`` is a msgpack header, ``{"total": n}``
or ``{"error": "not held" | "busy" | "bad request" | "source failed"}``; then come the ``n`` bytes, at most
``chunk_bytes`` per message. ``<namespace>.content.offer`` (unary) is the push side: "I hold this ref, fetch
it from me"; the answer is ``{"ok": bool, "reason": str}``.

Why chunked: hivemind frames every stream message whole (a length prefix, then the bytes), so one message of
64 MiB would be buffered whole on both sides, and unary calls are capped at 4 MiB by the daemon connection.
Why the hash: the sender is a stranger; a peer that sends anything but the promised bytes is refused, and is
avoided for a while so that :meth:`ContentTransfer.fetch_any` goes to the next holder.

Why files stream: a checkpoint file can be 2 GiB. A kind kept in files is registered with
:meth:`ContentTransfer.register_files`: it is served from disk a chunk at a time, and fetched to disk a chunk at
a time (:meth:`ContentTransfer.fetch_any_file`), so neither side ever holds it whole. What a peer holds for
others at once (row sets whole, a few chunks per file stream) is bounded by ``TransferLimits.serve_memory``
(``--max-serving-memory``).

Why the fetcher reads the stream itself (``call_binary_stream_handler``) instead of through
``P2P.iterate_protobuf_handler``: hivemind's reader trusts the 8-byte length prefix of each message and
buffers that many bytes before the caller sees any of it, so a stranger could make us hold gigabytes in
one "chunk". :func:`_read_message` reads the same framing but checks the length before reading the body.
The serving side is hivemind's ordinary ``add_protobuf_handler``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, get_args

import msgpack
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import p2pd_pb2, runtime_pb2

from garden.protocol.records import RecordError, decode_record
from garden.durable import fsync_path
from garden.lifecycle import Service
from garden.net.budget import ByteBudget
from garden.net.rate_limit import RateLimit
from garden.net.swarm import Swarm
from garden.protocol.content import (
    ERROR_BAD_REQUEST,
    ERROR_BUSY,
    ERROR_NOT_HELD,
    ERROR_SOURCE_FAILED,
    CHUNK_SLACK_BYTES,
    MAX_HEADER_BYTES,
    ContentKind,
    ContentHeader,
    ContentRef,
    OfferReply,
)

logger = logging.getLogger(__name__)

STREAM_CHUNKS = 4
"""Chunks a file stream holds in memory at once, counted against ``serve_memory``: the one read from disk, its
message, the message's bytes, and the connection's send buffer (hivemind waits for it to drain)."""

TRANSIENT = frozenset({"short"})
"""Failures that say nothing of the holder's honesty, only that its stream broke off (a home link dropped, a NAT
mapping expired, a stream reset under load): :meth:`ContentTransfer.fetch_any` tries such a holder again
(``TransferLimits.retries``) before it goes to the next one, or gives up when it was the only one. A holder that
cannot be reached at all is not tried twice: a dial to a dead peer can take many seconds."""

OFFER_REPLY_MARGIN = 5.0
"""Seconds an offer's receiver keeps back from ``offer_timeout`` so its answer arrives before the offerer
gives up."""

ContentSource = Callable[[ContentRef], Awaitable[bytes | None]]
"""The local holder: the full content of a ref, or None when this peer does not hold it. It must return the
bytes whose sha256 the ref names: fetchers avoid a peer that serves anything else."""
FileSource = Callable[[ContentRef], Awaitable[Path | None]]
"""The local holder of a kind kept in files: the file that holds a ref's content, or None. The file is streamed
from disk; it must not change while it is served (checkpoint files never do)."""
OfferHandler = Callable[[str, ContentRef], Awaitable[tuple[bool, str]]]
"""Called with (offering peer's id, ref) when a peer offers content; usually fetches it back from that peer
and stores it. Returns (accepted, reason)."""


class TransferError(RuntimeError):
    """A fetch or offer that did not work; says which peer, which content and why.

    :ivar reason: a short stable code (``"not held"``, ``"hash mismatch"``, ``"timeout"`` ...), the key of
      :attr:`TransferStats.refused` or :attr:`TransferStats.failed`
    """

    def __init__(self, peer_id: str, ref: ContentRef | None, reason: str, detail: str = "") -> None:
        what = f"{ref}" if ref is not None else "content"
        super().__init__(f"{what} from peer {peer_id}: {reason}" + (f" ({detail})" if detail else ""))
        self.peer_id, self.ref, self.reason, self.detail = peer_id, ref, reason, detail


@dataclass
class TransferLimits:
    """Sizes and time limits of transfers; the defaults suit home links and 64 MiB row sets.

    :param chunk_bytes: bytes per stream message, sent and accepted (+ framing slack). Part of the wire
      contract: a fetcher refuses chunks bigger than its own value, so every peer of a swarm keeps the default.
    :param max_bytes: per content kind, the most bytes a fetch accepts; a sender declaring more is refused
      before anything is downloaded. Every kind needs a cap.
    :param timeout: seconds for one whole fetch (connect, header, every chunk). Also bounds the local source's
      lookup when serving. 30 s carries 64 MiB at ~2.2 MB/s.
    :param kind_timeout: a longer ``timeout`` for kinds that can be big (a checkpoint file of a student:
      hundreds of MB).
    :param offer_timeout: seconds an offerer waits for the answer; the receiver usually fetches the content
      back before answering, so keep it above ``timeout``.
    :param avoid_seconds: how long a peer that sent garbage, too much or the wrong bytes is skipped.
    :param max_serving: concurrent fetch streams (and, separately, offers) served; more are answered "busy".
    :param serve_memory: the most bytes of content held in memory at once for peers (``--max-serving-memory``):
      a row set or prompt list whole while it is served, :data:`STREAM_CHUNKS` chunks per file stream. A fetch
      that does not fit waits up to half of ``timeout``, then is answered "busy".
    :param upload_rate: bytes per second this peer sends content at, all streams together (None: no cap;
      ``--max-upload-rate``); a capped rate stretches fetches, so big kinds keep their long timeouts
    :param download_rate: the same for what it fetches (``--max-download-rate``)
    :param retries: how many more times :meth:`ContentTransfer.fetch_any` tries a holder whose stream broke
      (:data:`TRANSIENT` failures), ``retry_delay`` seconds apart; a holder that refused or sent the wrong bytes
      is never tried again
    """

    chunk_bytes: int = 256 * 1024
    max_bytes: dict[str, int] = field(
        default_factory=lambda: {"prompts": 64 * 1024**2, "rows": 64 * 1024**2, "ckpt": 2 * 1024**3}
    )
    timeout: float = 30.0
    kind_timeout: dict[str, float] = field(default_factory=lambda: {"ckpt": 1800.0})
    offer_timeout: float = 60.0
    avoid_seconds: float = 600.0
    max_serving: int = 8
    serve_memory: int = 256 * 1024**2
    upload_rate: float | None = None
    download_rate: float | None = None
    retries: int = 1
    retry_delay: float = 1.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        missing = [kind for kind in get_args(ContentKind) if kind not in self.max_bytes]
        if missing:
            raise ValueError(f"max_bytes needs a cap for every content kind; missing {missing}")
        if self.timeout <= 0 or self.offer_timeout <= OFFER_REPLY_MARGIN:
            raise ValueError(f"timeout must be > 0 and offer_timeout > {OFFER_REPLY_MARGIN} s")
        if self.retries < 0 or self.retry_delay < 0:
            raise ValueError(f"retries and retry_delay must be >= 0, got {self.retries} and {self.retry_delay}")
        if self.max_serving < 1:
            raise ValueError(f"max_serving must be >= 1, got {self.max_serving}")
        if self.serve_memory < STREAM_CHUNKS * self.chunk_bytes:
            raise ValueError(
                f"serve_memory must hold at least one file stream ({STREAM_CHUNKS * self.chunk_bytes} bytes), "
                f"got {self.serve_memory}"
            )


@dataclass
class TransferStats:
    """Counters for the status page. ``refused``: fetches refused for the sender's fault (the sender is
    avoided); ``failed``: fetches that failed otherwise (not held, busy, unreachable, timeout)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    fetches_ok: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    served: int = 0
    busy: int = 0


@dataclass(frozen=True)
class TransferSnapshot:
    """The transfer's counters as ``/metrics`` shows them, copied so that a reader never sees them move."""

    bytes_sent: int
    bytes_received: int
    fetches_ok: int
    served: int
    busy: int
    serve_memory_used: int
    serve_memory_peak: int
    serve_memory: int
    refused: dict[str, int]
    failed: dict[str, int]


class _Failure(Exception):
    """Internal: why a fetch stopped; ``blame`` means the sender misbehaved (it gets avoided)."""

    def __init__(self, reason: str, detail: str = "", blame: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.detail, self.blame = reason, detail, blame


class _Sink(Protocol):
    """Where a fetch puts the bytes as they arrive: memory, or a file."""

    async def write(self, chunk: bytes) -> None: ...


class _Memory:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)


class _File:
    """Writes a fetch to ``path`` (created or truncated), a chunk at a time, off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    async def write(self, chunk: bytes) -> None:
        if self._file is None:
            self._file = await asyncio.to_thread(self.path.open, "wb")
        await asyncio.to_thread(self._file.write, chunk)

    async def finish(self, ok: bool) -> None:
        """Flush and close it; a fetch that failed leaves no file behind."""
        if self._file is None and ok:  # empty content: no chunk came
            self._file = await asyncio.to_thread(self.path.open, "wb")
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
        if ok:
            await asyncio.to_thread(fsync_path, self.path)
        else:
            self.path.unlink(missing_ok=True)


def _pack(obj: dict[str, Any]) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb(obj, use_bin_type=True))


class ContentTransfer(Service):
    """Serves local content to peers and fetches content from them (see the module docstring for the wire).

    One per daemon. The package that owns a kind of content registers its holder with :meth:`register` (and,
    for content peers may push, its offer policy with :meth:`accept_offers`); the transfer moves bytes and
    checks hashes, and knows no kind's meaning::

        transfer = ContentTransfer(swarm)                 # or a hivemind P2P
        book.transfer.register("prompts", book.content)  # each owner, for its kinds
        await transfer.start()
        data, holder = await transfer.fetch_any(holders, ref)  # the hash is checked
        await transfer.close()

    :param p2p: the swarm (its P2P replica is taken in :meth:`start`) or a hivemind P2P
    :param source: the holder of every kind not registered (tests; the daemon registers each kind)
    :param limits: sizes and timeouts, see :class:`TransferLimits`
    :param namespace: prefix of the protocol names, so that two swarms' daemons never mix
    :param on_offer: the offer policy of every kind not registered; without one, offers are refused
    """

    name = "transfer"

    def __init__(
        self,
        p2p: P2P | Swarm,
        source: ContentSource | None = None,
        limits: TransferLimits | None = None,
        namespace: str = "garden",
        on_offer: OfferHandler | None = None,
    ) -> None:
        self._p2p_from = p2p
        self._p2p: P2P | None = p2p if isinstance(p2p, P2P) else None
        self._sources: dict[str, ContentSource] = {}
        self._file_sources: dict[str, FileSource] = {}
        self._offer_handlers: dict[str, OfferHandler] = {}
        self._default_source, self._default_on_offer = source, on_offer
        self.limits = limits or TransferLimits()
        self.fetch_name, self.offer_name = f"{namespace}.content.fetch", f"{namespace}.content.offer"
        self.stats = TransferStats()
        chunk = self.limits.chunk_bytes
        self.upload = RateLimit(self.limits.upload_rate, burst=max(chunk, self.limits.upload_rate or 0))
        self.download = RateLimit(self.limits.download_rate, burst=max(chunk, self.limits.download_rate or 0))
        self.memory = ByteBudget(self.limits.serve_memory)
        self._avoid_until: dict[str, float] = {}
        self._serving = 0
        self._offers = 0
        self._started = False

    def register(self, kind: ContentKind, source: ContentSource) -> None:
        """``source`` holds this kind of content here (what peers may fetch from this one)."""
        self._sources[kind] = source

    def register_files(self, kind: ContentKind, source: FileSource) -> None:
        """``source`` holds this kind of content in files here: they are streamed from disk, never read whole."""
        self._file_sources[kind] = source

    def accept_offers(self, kind: ContentKind, on_offer: OfferHandler) -> None:
        """Offers of this kind go to ``on_offer`` (a package may hold a kind that another one takes from peers)."""
        self._offer_handlers[kind] = on_offer

    def _source_of(self, kind: str) -> ContentSource | None:
        return self._sources.get(kind, self._default_source)

    def _offer_handler_of(self, kind: str) -> OfferHandler | None:
        return self._offer_handlers.get(kind, self._default_on_offer)

    def snapshot(self) -> TransferSnapshot:
        stats = self.stats
        return TransferSnapshot(
            bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received, fetches_ok=stats.fetches_ok,
            served=stats.served, busy=stats.busy, serve_memory_used=self.memory.used,
            serve_memory_peak=self.memory.peak, serve_memory=self.memory.total,
            refused=dict(stats.refused), failed=dict(stats.failed),
        )  # fmt: skip

    @property
    def p2p(self) -> P2P:
        if self._p2p is None:
            raise RuntimeError("the content transfer is not started")
        return self._p2p

    @property
    def peer_id(self) -> str:
        return str(self.p2p.peer_id.to_base58())

    async def start(self) -> None:
        """Take the swarm's P2P replica, and register the fetch and offer handlers on it."""
        if self._started:
            return
        if self._p2p is None:
            assert not isinstance(self._p2p_from, P2P)
            self._p2p = await self._p2p_from.p2p()
        await self._p2p.add_protobuf_handler(
            self.fetch_name, self._rpc_fetch, runtime_pb2.ExpertRequest, stream_output=True
        )
        try:
            await self._p2p.add_protobuf_handler(self.offer_name, self._rpc_offer, runtime_pb2.ExpertRequest)
        except BaseException:
            await self._remove(self.fetch_name, stream_output=True)
            raise
        self._started = True

    async def close(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Remove both handlers; safe to call twice, or after the DHT (and its daemon) is gone."""
        if not self._started:
            return
        self._started = False
        await self._remove(self.fetch_name, stream_output=True)
        await self._remove(self.offer_name, stream_output=False)

    async def _remove(self, name: str, stream_output: bool) -> None:
        try:
            await self.p2p.remove_protobuf_handler(name, stream_output=stream_output)
        except Exception as e:  # the daemon may already be gone; nothing left to remove then
            logger.debug(f"removing handler {name}: {e!r}")

    # --- fetching -------------------------------------------------------------------------------------------

    def avoided(self, peer_id: str) -> bool:
        """Whether ``peer_id`` recently sent garbage, too much or the wrong bytes (and is skipped for now)."""
        until = self._avoid_until.get(peer_id)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._avoid_until[peer_id]
            return False
        return True

    async def fetch(self, peer_id: str, ref: ContentRef) -> bytes:
        """The content ``ref`` names, from ``peer_id``, hash-checked. Raises only :class:`TransferError`."""
        sink = _Memory()
        await self._fetch(peer_id, ref, sink)
        return await asyncio.to_thread(b"".join, sink.chunks)  # up to 64 MiB copied: not on the event loop

    async def fetch_file(self, peer_id: str, ref: ContentRef, dest: Path) -> None:
        """Fetch ``ref`` from ``peer_id`` straight into the file ``dest`` (created or replaced; flushed to disk),
        a chunk at a time: the content is never held whole. When the fetch fails (a wrong hash included),
        ``dest`` is deleted and :class:`TransferError` raised. Put ``dest`` where a partial file does no harm
        (a staging directory): it is written in place."""
        sink = _File(dest)
        try:
            await self._fetch(peer_id, ref, sink)
        except BaseException:
            await asyncio.shield(sink.finish(ok=False))
            raise
        await sink.finish(ok=True)

    async def _fetch(self, peer_id: str, ref: ContentRef, sink: _Sink) -> None:
        timeout = self.limits.kind_timeout.get(ref.kind, self.limits.timeout)
        try:
            async with asyncio.timeout(timeout):
                await self._download(peer_id, ref, sink)
        except _Failure as e:
            failure = e
        except TimeoutError:
            failure = _Failure("timeout", f"over {timeout:.0f} s")
        except Exception as e:  # the daemon's errors for a dead or unknown peer, a broken connection
            failure = _Failure("unreachable", f"{type(e).__name__}: {str(e)[:200]}")
        else:
            self.stats.fetches_ok += 1
            return
        if failure.blame:
            now = time.monotonic()
            self._avoid_until = {peer: until for peer, until in self._avoid_until.items() if until > now}
            self._avoid_until[peer_id] = now + self.limits.avoid_seconds
            self.stats.refused[failure.reason] += 1
            logger.warning(
                f"refused {ref} from peer {peer_id}: {failure.reason} ({failure.detail}); "
                f"avoiding it for {self.limits.avoid_seconds:.0f} s"
            )
        else:
            self.stats.failed[failure.reason] += 1
            logger.debug(f"fetch of {ref} from peer {peer_id} failed: {failure.reason} ({failure.detail})")
        raise TransferError(peer_id, ref, failure.reason, failure.detail)

    async def fetch_any(self, peer_ids: Sequence[str], ref: ContentRef) -> tuple[bytes, str]:
        """Try the holders in order (skipping this peer and avoided ones); return (content, the peer it came
        from). Raises :class:`TransferError` listing every peer's failure when none worked."""
        got: list[bytes] = []

        async def fetch(peer_id: str) -> None:
            got.append(await self.fetch(peer_id, ref))

        source = await self._any(peer_ids, ref, fetch)
        return got[-1], source

    async def fetch_any_file(self, peer_ids: Sequence[str], ref: ContentRef, dest: Path) -> str:
        """:meth:`fetch_any` into the file ``dest`` (see :meth:`fetch_file`); returns the peer it came from."""
        return await self._any(peer_ids, ref, lambda peer_id: self.fetch_file(peer_id, ref, dest))

    async def _any(self, peer_ids: Sequence[str], ref: ContentRef, fetch: Callable[[str], Awaitable[None]]) -> str:
        problems: list[str] = []
        for peer_id in dict.fromkeys(peer_ids):  # each once, order kept
            if peer_id == self.peer_id:
                continue
            if self.avoided(peer_id):
                problems.append(f"{peer_id}: avoided")
                continue
            for attempt in range(1 + self.limits.retries):
                try:
                    await fetch(peer_id)
                    return peer_id
                except TransferError as e:
                    problem = f"{peer_id}: {e.reason}" + (f" ({e.detail})" if e.detail else "")
                    if e.reason not in TRANSIENT or attempt == self.limits.retries:
                        problems.append(problem)
                        break
                    logger.info(f"{problem}; trying it again in {self.limits.retry_delay:.0f} s")
                    await asyncio.sleep(self.limits.retry_delay)
        raise TransferError("any holder", ref, "no holder could serve it", "; ".join(problems) or "no other holders")

    async def _download(self, peer_id: str, ref: ContentRef, sink: _Sink) -> None:
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception as e:
            raise _Failure("bad peer id", str(e)[:100]) from None
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, self.fetch_name)
        with closing(writer):
            await P2P.send_protobuf(runtime_pb2.ExpertRequest(metadata=ref.to_bytes()), writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

            raw_header = await _read_message(reader, MAX_HEADER_BYTES)
            if raw_header is None:
                raise _Failure("short", "the stream ended before the header")
            try:
                header = decode_record(ContentHeader, raw_header, "header")
            except RecordError as e:
                raise _Failure("bad header", str(e), blame=True) from None
            if header.error is not None:
                known = header.error in (ERROR_NOT_HELD, ERROR_BUSY)  # else a newer peer's reason, or garbage
                raise _Failure(header.error if known else "refused", header.error)
            if header.total is None:
                raise _Failure("bad header", "neither total nor error", blame=True)
            cap = self.limits.max_bytes[ref.kind]
            if header.total > cap:
                raise _Failure("too large", f"declares {header.total} bytes, the {ref.kind} cap is {cap}", blame=True)

            received, digest = 0, hashlib.sha256()
            while received < header.total:
                chunk = await _read_message(reader, self.limits.chunk_bytes + CHUNK_SLACK_BYTES)
                if chunk is None:
                    raise _Failure("short", f"the stream ended at {received} of {header.total} bytes")
                if len(chunk) > self.limits.chunk_bytes:
                    raise _Failure("oversize chunk", f"{len(chunk)} bytes > {self.limits.chunk_bytes}", blame=True)
                self.stats.bytes_received += len(chunk)
                await self.download.take(len(chunk))
                if received + len(chunk) > header.total:
                    raise _Failure("overrun", f"more than the declared {header.total} bytes", blame=True)
                received += len(chunk)
                digest.update(chunk)  # as it arrives: hashing 64 MiB at once would stall the event loop
                await sink.write(chunk)
                await asyncio.sleep(0)  # buffered chunks are read without a pause: let the loop's others run
        if digest.hexdigest() != ref.sha256:
            raise _Failure("hash mismatch", f"got sha256 {digest.hexdigest()[:12]}", blame=True)

    # --- offering -------------------------------------------------------------------------------------------

    async def offer(self, peer_id: str, ref: ContentRef) -> tuple[bool, str]:
        """Ask ``peer_id`` to fetch ``ref`` from us; returns its (accepted, reason). Waits up to
        ``limits.offer_timeout`` (the peer usually fetches before it answers); raises :class:`TransferError`
        when the peer cannot be reached or answers garbage."""
        request = runtime_pb2.ExpertRequest(metadata=ref.to_bytes())
        try:
            peer = PeerID.from_base58(peer_id)
            async with asyncio.timeout(self.limits.offer_timeout):
                response = await self.p2p.call_protobuf_handler(
                    peer, self.offer_name, request, runtime_pb2.ExpertResponse
                )
        except TimeoutError:
            raise TransferError(
                peer_id, ref, "timeout", f"no answer to the offer in {self.limits.offer_timeout} s"
            ) from None
        except Exception as e:
            raise TransferError(peer_id, ref, "unreachable", f"{type(e).__name__}: {str(e)[:200]}") from None
        try:
            if len(response.metadata) > MAX_HEADER_BYTES:
                raise RecordError(f"{len(response.metadata)} bytes")
            reply = decode_record(OfferReply, response.metadata, "offer reply")
        except RecordError as e:
            raise TransferError(peer_id, ref, "bad offer reply", str(e)) from None
        return reply.ok, reply.reason

    async def _rpc_offer(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        sender = context.remote_id.to_base58()
        try:
            ref = ContentRef.from_bytes(request.metadata)
        except RecordError as e:
            logger.info(f"malformed offer from peer {sender}: {e}")
            return _pack({"ok": False, "reason": ERROR_BAD_REQUEST})
        on_offer = self._offer_handler_of(ref.kind)
        if on_offer is None:
            return _pack({"ok": False, "reason": "offers not accepted"})
        if self._offers >= self.limits.max_serving:
            return _pack({"ok": False, "reason": ERROR_BUSY})
        self._offers += 1
        try:
            async with asyncio.timeout(self.limits.offer_timeout - OFFER_REPLY_MARGIN):
                ok, reason = await on_offer(sender, ref)
            return _pack({"ok": bool(ok), "reason": str(reason)[:200]})
        except TimeoutError:
            logger.info(f"offer of {ref} from peer {sender} not handled in time")
            return _pack({"ok": False, "reason": "timeout"})
        except Exception:
            logger.warning(f"offer handler failed on {ref} from peer {sender}", exc_info=True)
            return _pack({"ok": False, "reason": "offer handler failed"})
        finally:
            self._offers -= 1

    # --- serving --------------------------------------------------------------------------------------------

    async def _rpc_fetch(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Answer one fetch: a header, then the content in chunks. Never raises: every refusal is a header."""
        requester = context.remote_id.to_base58()
        if self._serving >= self.limits.max_serving:
            self.stats.busy += 1
            yield _pack({"error": ERROR_BUSY})
            return
        self._serving += 1
        try:
            try:
                ref = ContentRef.from_bytes(request.metadata)
            except RecordError as e:
                logger.info(f"malformed fetch request from peer {requester}: {e}")
                yield _pack({"error": ERROR_BAD_REQUEST})
                return
            if ref.kind in self._file_sources:
                serve = self._serve_file(ref, requester)
            else:
                serve = self._serve_bytes(ref, requester)
            async with aclosing(serve):  # a fetcher that hangs up closes the file at once, not at garbage collection
                async for message in serve:
                    yield message
        finally:
            self._serving -= 1

    async def _serve_bytes(self, ref: ContentRef, requester: str) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Content held in memory whole: the room for the kind's biggest is taken before the source is asked,
        and shrunk to the content's size once it is known."""
        source = self._source_of(ref.kind)
        if source is None:
            yield _pack({"error": ERROR_NOT_HELD})
            return
        held = min(self.limits.max_bytes[ref.kind], self.memory.total)
        if not await self._take_memory(held, ref, requester):
            yield _pack({"error": ERROR_BUSY})
            return
        try:
            try:
                async with asyncio.timeout(self.limits.timeout):
                    content = await source(ref)
            except Exception:
                logger.warning(f"content source failed on {ref} for peer {requester}", exc_info=True)
                yield _pack({"error": ERROR_SOURCE_FAILED})
                return
            if content is None:
                yield _pack({"error": ERROR_NOT_HELD})
                return
            if not isinstance(content, bytes):
                logger.warning(f"content source returned {type(content).__name__} for {ref}, not bytes")
                yield _pack({"error": ERROR_SOURCE_FAILED})
                return
            needed = len(content) + self.limits.chunk_bytes
            if needed > held and not self.memory.grow(needed - held):
                logger.warning(f"{ref} ({len(content)} bytes) does not fit --max-serving-memory now; answered busy")
                self.stats.busy += 1
                yield _pack({"error": ERROR_BUSY})
                return
            self.memory.give(max(0, held - needed))
            held = needed
            yield _pack({"total": len(content)})
            view, step = memoryview(content), self.limits.chunk_bytes
            for offset in range(0, len(content), step):
                chunk = bytes(view[offset : offset + step])
                await self.upload.take(len(chunk))
                yield runtime_pb2.ExpertResponse(metadata=chunk)
                self.stats.bytes_sent += len(chunk)
                await asyncio.sleep(0)  # a fast peer drains the socket at once: let the loop's others run
            self.stats.served += 1
        finally:
            self.memory.give(held)

    async def _serve_file(self, ref: ContentRef, requester: str) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A file streamed from disk, read a chunk at a time off the event loop."""
        source = self._file_sources[ref.kind]
        held = STREAM_CHUNKS * self.limits.chunk_bytes
        if not await self._take_memory(held, ref, requester):
            yield _pack({"error": ERROR_BUSY})
            return
        file: BinaryIO | None = None
        try:
            try:
                async with asyncio.timeout(self.limits.timeout):
                    path = await source(ref)
                    file = None if path is None else await asyncio.to_thread(path.open, "rb")
            except Exception:
                logger.warning(f"content source failed on {ref} for peer {requester}", exc_info=True)
                yield _pack({"error": ERROR_SOURCE_FAILED})
                return
            if file is None:
                yield _pack({"error": ERROR_NOT_HELD})
                return
            total = os.fstat(file.fileno()).st_size
            yield _pack({"total": total})
            sent, step = 0, self.limits.chunk_bytes
            while sent < total:
                chunk = await asyncio.to_thread(file.read, min(step, total - sent))
                if not chunk:  # the file shrank under us; the fetcher sees a short stream and tries elsewhere
                    logger.warning(f"{ref}: the file ended at {sent} of {total} bytes while served")
                    return
                await self.upload.take(len(chunk))
                yield runtime_pb2.ExpertResponse(metadata=chunk)
                sent += len(chunk)
                self.stats.bytes_sent += len(chunk)
            self.stats.served += 1
        finally:
            if file is not None:
                file.close()
            self.memory.give(held)

    async def _take_memory(self, n: int, ref: ContentRef, requester: str) -> bool:
        if await self.memory.take(n, timeout=self.limits.timeout / 2):
            return True
        self.stats.busy += 1
        logger.info(f"{ref} for peer {requester}: no room in --max-serving-memory; answered busy")
        return False


async def _read_message(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """The ``metadata`` of the next ``ExpertResponse`` on a hivemind protobuf stream (``P2P.send_protobuf``'s
    framing: a marker byte, an 8-byte length, the message), or None at the end of the stream. The length is
    checked against ``max_bytes`` before the body is read."""
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None
    try:
        length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
        if length > max_bytes:
            raise _Failure("oversize chunk", f"a {length}-byte message, the cap is {max_bytes}", blame=True)
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise _Failure("short", "the stream ended inside a message") from None
    if marker == P2P.ERROR_MARKER:  # hivemind's handler wrapper caught an exception: not a garden server bug
        error = p2pd_pb2.RPCError()
        try:
            error.ParseFromString(body)
        except DecodeError:
            raise _Failure("garbage", "undecodable error message", blame=True) from None
        raise _Failure("remote error", error.message[:200])
    if marker != P2P.MESSAGE_MARKER:
        raise _Failure("garbage", f"unknown message marker {marker!r}", blame=True)
    message = runtime_pb2.ExpertResponse()
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise _Failure("garbage", "undecodable message", blame=True) from None
    return bytes(message.metadata)
