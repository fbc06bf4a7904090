"""Content transfer between real hivemind peers on 127.0.0.1: chunked fetches that arrive intact, refusals
of liars, oversize senders and garbage (who then get avoided), servers that survive bad requests and failing
sources, offers; plus the ContentRef schema."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hivemind
import msgpack
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from garden.net.transfer import ContentTransfer, TransferError, TransferLimits
from garden.protocol.content import ContentKind, ContentRef
from garden.protocol import signing
from garden.protocol.records import RecordError

pytestmark = pytest.mark.heavy(10)  # seconds in `make check`: see tests/conftest.py

module_loop = pytest.mark.asyncio(loop_scope="module")
"""Every async test runs in the module's event loop: the P2P replicas (and their handlers) belong to it."""

MISSION = secrets.token_hex(32)


def ref_for(data: bytes, kind: ContentKind = "rows", item: str = "3:0123456789abcdef") -> ContentRef:
    return ContentRef(kind=kind, mission_id=MISSION, item=item, sha256=hashlib.sha256(data).hexdigest())


def limits(**changes: Any) -> TransferLimits:
    fields: dict[str, Any] = {"chunk_bytes": 1000, "timeout": 5.0, "offer_timeout": 10.0}  # small chunks, fast
    return TransferLimits(**{**fields, **changes})


class Holder:
    """A content source backed by a dict, keyed by sha256; ``lie`` serves other bytes than promised."""

    def __init__(self, *contents: bytes, lie: bool = False) -> None:
        self.contents = {hashlib.sha256(c).hexdigest(): c for c in contents}
        self.lie = lie
        self.asked = 0

    async def __call__(self, ref: ContentRef) -> bytes | None:
        self.asked += 1
        if self.lie:
            return b"not what you asked for" * 100
        return self.contents.get(ref.sha256)


def unique_namespace() -> str:
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def dhts() -> Iterator[list[hivemind.DHT]]:
    started: list[hivemind.DHT] = []
    try:
        for _ in range(3):
            started.append(
                hivemind.DHT(
                    initial_peers=[str(m) for m in started[0].get_visible_maddrs()] if started else None,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    start=True,
                )
            )
        yield started
    finally:
        for dht in started:
            dht.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def p2ps(dhts: list[hivemind.DHT]) -> AsyncIterator[list[P2P]]:
    replicas = [await dht.replicate_p2p() for dht in dhts]
    yield replicas
    for replica in replicas:
        await replica.shutdown()


@asynccontextmanager
async def started(*transfers: ContentTransfer) -> AsyncIterator[None]:
    try:
        for transfer in transfers:
            await transfer.start()
        yield
    finally:
        for transfer in transfers:
            await transfer.stop()


def pair(
    p2ps: list[P2P], source: Callable[..., Any], server_limits: TransferLimits | None = None, **client_limits: Any
) -> tuple[ContentTransfer, ContentTransfer, str]:
    """(client on peer 0, server on peer 1, the server's peer id) in a namespace of their own."""
    namespace = unique_namespace()
    client = ContentTransfer(p2ps[0], Holder(), limits(**client_limits), namespace=namespace)
    server = ContentTransfer(p2ps[1], source, server_limits or limits(), namespace=namespace)
    return client, server, server.peer_id


# --- the record ----------------------------------------------------------------------------------------------


def test_content_ref_roundtrip_and_rejections() -> None:
    ref = ref_for(b"hello")
    assert ContentRef.from_bytes(ref.to_bytes()) == ref
    good = ref.model_dump()
    for changes in (
        {"kind": "checkpoint"},
        {"mission_id": MISSION.upper()},
        {"sha256": ref.sha256[:-1]},
        {"sha256": 123},
        {"item": "x" * 161},
        {"item": 3},
    ):
        raw = msgpack.packb({**good, **changes}, use_bin_type=True)
        with pytest.raises(RecordError):
            ContentRef.from_bytes(raw)
    for raw in (b"\xff\x00junk", msgpack.packb([1, 2]), b"\x00" * 2000):
        with pytest.raises(RecordError):
            ContentRef.from_bytes(raw)
    with pytest.raises(ValueError, match="every content kind"):
        TransferLimits(max_bytes={"rows": 10})


# --- fetching ------------------------------------------------------------------------------------------------


@module_loop
async def test_multi_chunk_content_arrives_intact(p2ps: list[P2P]) -> None:
    data = os.urandom(10 * 1000 + 123)  # 11 chunks of 1000 bytes
    client, server, server_id = pair(p2ps, Holder(data))
    async with started(client, server):
        assert await client.fetch(server_id, ref_for(data)) == data
        got, source = await client.fetch_any([client.peer_id, server_id], ref_for(data))  # skips itself
    assert (got, source) == (data, server_id)
    assert client.stats.fetches_ok == 2 and client.stats.bytes_received == 2 * len(data)
    assert server.stats.served == 2 and server.stats.bytes_sent == 2 * len(data)
    assert not client.stats.refused


@module_loop
async def test_capped_rates_stretch_a_transfer(p2ps: list[P2P]) -> None:
    """40 chunks of 1000 bytes at 10 kB/s up (and, separately, down) take about 3 s after a 1 s burst."""
    import time

    data = os.urandom(40_000)
    for server_rate, client_rate in ((10_000.0, None), (None, 10_000.0)):
        client, server, server_id = pair(
            p2ps, Holder(data), limits(upload_rate=server_rate), download_rate=client_rate
        )
        async with started(client, server):
            began = time.monotonic()
            assert await client.fetch(server_id, ref_for(data)) == data
            took = time.monotonic() - began
        assert 2.5 <= took <= 8.0, (server_rate, client_rate, took)
        limited = server.upload if server_rate else client.download
        assert limited.waited_s >= 2.5


@module_loop
async def test_not_held_fails_without_avoiding_the_peer(p2ps: list[P2P]) -> None:
    client, server, server_id = pair(p2ps, Holder(b"something else"))
    async with started(client, server):
        with pytest.raises(TransferError, match="not held") as info:
            await client.fetch(server_id, ref_for(b"wanted"))
    assert info.value.reason == "not held" and server_id in str(info.value)
    assert not client.avoided(server_id)
    assert client.stats.failed["not held"] == 1 and not client.stats.refused


@module_loop
async def test_a_liar_is_refused_avoided_and_skipped_for_an_honest_holder(p2ps: list[P2P]) -> None:
    data = os.urandom(5000)
    namespace = unique_namespace()
    client = ContentTransfer(p2ps[0], Holder(), limits(), namespace=namespace)
    liar_source = Holder(lie=True)
    liar = ContentTransfer(p2ps[1], liar_source, limits(), namespace=namespace)
    honest = ContentTransfer(p2ps[2], Holder(data), limits(), namespace=namespace)
    async with started(client, liar, honest):
        got, source = await client.fetch_any([liar.peer_id, honest.peer_id], ref_for(data))
        assert (got, source) == (data, honest.peer_id)
        assert client.avoided(liar.peer_id) and not client.avoided(honest.peer_id)
        assert client.stats.refused["hash mismatch"] == 1
        seen = client.snapshot()  # what /metrics reads: a copy that later fetches do not move
        assert (seen.refused, seen.fetches_ok) == ({"hash mismatch": 1}, 1)
        assert seen.bytes_received == client.stats.bytes_received > len(data)  # the liar's bytes count too

        again, source = await client.fetch_any([liar.peer_id, honest.peer_id], ref_for(data))
        assert (again, source) == (data, honest.peer_id)
        assert liar_source.asked == 1  # avoided: not asked again
        assert (seen.fetches_ok, client.snapshot().fetches_ok) == (1, 2)
        with pytest.raises(TransferError, match=f"{liar.peer_id}: avoided"):
            await client.fetch_any([liar.peer_id], ref_for(data))


@module_loop
async def test_content_over_the_kind_cap_is_refused_before_download(p2ps: list[P2P]) -> None:
    data = os.urandom(50_000)
    client, server, server_id = pair(p2ps, Holder(data), max_bytes={"prompts": 10**6, "rows": 5000, "ckpt": 10**6})
    async with started(client, server):
        with pytest.raises(TransferError, match="too large"):
            await client.fetch(server_id, ref_for(data))
        assert await client.fetch(server_id, ref_for(data, kind="prompts", item="")) == data  # its cap is larger
    assert client.stats.refused["too large"] == 1 and client.avoided(server_id)
    assert client.stats.bytes_received == len(data)  # only the allowed fetch


@module_loop
async def test_a_chunk_over_the_cap_is_refused_unread(p2ps: list[P2P]) -> None:
    data = os.urandom(100_000)
    client, server, server_id = pair(p2ps, Holder(data), server_limits=limits(chunk_bytes=64_000))
    async with started(client, server):
        with pytest.raises(TransferError, match="oversize chunk"):
            await client.fetch(server_id, ref_for(data))
    assert client.avoided(server_id) and client.stats.bytes_received == 0


# --- files and the serving memory ----------------------------------------------------------------------------


class Files:
    """A file source: the files under ``root`` by sha256, as checkpoint sharing serves them."""

    def __init__(self, *paths: Path) -> None:
        self.paths = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in paths}

    async def __call__(self, ref: ContentRef) -> Path | None:
        return self.paths.get(ref.sha256)


@module_loop
async def test_a_file_streams_from_disk_to_disk(p2ps: list[P2P], tmp_path: Path) -> None:
    data = os.urandom(20 * 1000 + 7)
    (tmp_path / "served.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    namespace = unique_namespace()
    client = ContentTransfer(p2ps[0], Holder(), limits(), namespace=namespace)
    server = ContentTransfer(p2ps[1], None, limits(), namespace=namespace)
    server.register_files("ckpt", Files(tmp_path / "served.bin", tmp_path / "empty.bin"))
    async with started(client, server):
        dest = tmp_path / "fetched.bin"
        await client.fetch_file(server.peer_id, ref_for(data, kind="ckpt", item="1/model/x"), dest)
        assert dest.read_bytes() == data
        empty = ref_for(b"", kind="ckpt", item="1/e")
        assert await client.fetch_any_file([server.peer_id], empty, dest) == server.peer_id
        assert dest.read_bytes() == b""
        assert await client.fetch(server.peer_id, ref_for(data, kind="ckpt", item="1/model/x")) == data
        with pytest.raises(TransferError, match="not held"):
            await client.fetch_file(server.peer_id, ref_for(b"other", kind="ckpt", item="1/y"), dest)
        assert not dest.exists()  # a failed fetch leaves no file
    assert server.stats.served == 3 and server.memory.used == 0
    assert server.memory.peak == 4 * 1000  # STREAM_CHUNKS chunks per file stream, whatever the file's size


@module_loop
async def test_a_lying_file_server_leaves_no_file(p2ps: list[P2P], tmp_path: Path) -> None:
    (tmp_path / "other.bin").write_bytes(os.urandom(5000))
    wanted = os.urandom(5000)

    async def lie(ref: ContentRef) -> Path:
        return tmp_path / "other.bin"

    namespace = unique_namespace()
    client = ContentTransfer(p2ps[0], Holder(), limits(), namespace=namespace)
    server = ContentTransfer(p2ps[1], None, limits(), namespace=namespace)
    server.register_files("ckpt", lie)
    dest = tmp_path / "fetched.bin"
    async with started(client, server):
        with pytest.raises(TransferError, match="hash mismatch"):
            await client.fetch_file(server.peer_id, ref_for(wanted, kind="ckpt", item="1/x"), dest)
    assert not dest.exists() and client.avoided(server.peer_id)


@module_loop
async def test_content_past_the_serving_memory_waits_or_is_answered_busy(p2ps: list[P2P]) -> None:
    """Row sets are served from memory: with room for one 30 kB row set at a time, a second fetch waits for the
    first to finish, and a row set bigger than the whole budget is answered busy (the fetcher tries elsewhere)."""
    small, big = os.urandom(30_000), os.urandom(80_000)
    release = asyncio.Event()
    holder = Holder(small, big)

    async def slow(ref: ContentRef) -> bytes | None:
        if ref.sha256 == ref_for(small).sha256 and not release.is_set():
            await release.wait()
        return await holder(ref)

    caps = {"prompts": 40_000, "rows": 40_000, "ckpt": 10**6}
    server_limits = limits(serve_memory=50_000, max_bytes=caps)
    client, server, server_id = pair(p2ps, slow, server_limits=server_limits, max_bytes={**caps, "rows": 10**6})
    async with started(client, server):
        first = asyncio.create_task(client.fetch(server_id, ref_for(small)))
        await asyncio.sleep(0.5)
        assert server.memory.used == 40_000  # room for the kind's biggest, taken before the source is asked
        second = asyncio.create_task(client.fetch(server_id, ref_for(small)))
        await asyncio.sleep(0.5)
        assert not second.done() and server.memory.used == 40_000  # waiting for room
        release.set()
        assert await first == small and await second == small
        with pytest.raises(TransferError, match="busy"):
            await client.fetch(server_id, ref_for(big))
    assert server.memory.used == 0 and server.memory.peak <= 50_000
    assert server.snapshot().busy == 1 and not client.avoided(server_id)


def fake_server(*messages: bytes) -> Callable[..., AsyncIterator[runtime_pb2.ExpertResponse]]:
    async def handler(request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[Any]:
        for metadata in messages:
            yield runtime_pb2.ExpertResponse(metadata=metadata)

    return handler


def header(**fields: Any) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    "messages, reason, avoided",
    [
        ((b"\xff\x00junk",), "bad header", True),
        ((header(total="10"),), "bad header", True),
        ((header(total=10), b"x" * 20), "overrun", True),
        ((header(total=100), b"x" * 10), "short", False),
        ((), "short", False),
        ((header(error="disk on fire"),), "refused", False),
    ],
)
@module_loop
async def test_misbehaving_senders(p2ps: list[P2P], messages: tuple[bytes, ...], reason: str, avoided: bool) -> None:
    client, _, server_id = pair(p2ps, Holder())
    await p2ps[1].add_protobuf_handler(
        client.fetch_name, fake_server(*messages), runtime_pb2.ExpertRequest, stream_output=True
    )
    try:
        with pytest.raises(TransferError) as info:
            await client.fetch(server_id, ref_for(b"x" * 10))
    finally:
        await p2ps[1].remove_protobuf_handler(client.fetch_name, stream_output=True)
    assert info.value.reason == reason
    assert client.avoided(server_id) is avoided


@module_loop
async def test_a_holder_whose_stream_broke_off_is_tried_again_and_a_liar_is_not(p2ps: list[P2P]) -> None:
    """A stream cut mid-transfer (a home link drops) says nothing of the holder: fetch_any tries it once more
    and gets the content; a stream cut on every try ends in a clear error; a holder that refused is asked once."""
    data = os.urandom(3000)
    client, _, server_id = pair(p2ps, Holder(), retry_delay=0.1)
    calls: list[int] = []

    def cut_first(cuts: int) -> Callable[..., AsyncIterator[runtime_pb2.ExpertResponse]]:
        async def handler(request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[Any]:
            calls.append(1)
            yield runtime_pb2.ExpertResponse(metadata=header(total=len(data)))
            yield runtime_pb2.ExpertResponse(metadata=data[:1000])
            if len(calls) > cuts:
                for offset in range(1000, len(data), 1000):
                    yield runtime_pb2.ExpertResponse(metadata=data[offset : offset + 1000])

        return handler

    for cuts, expected in ((1, data), (2, None)):
        calls.clear()
        await p2ps[1].add_protobuf_handler(
            client.fetch_name, cut_first(cuts), runtime_pb2.ExpertRequest, stream_output=True
        )
        try:
            if expected is None:
                with pytest.raises(TransferError, match="short") as info:
                    await client.fetch_any([server_id], ref_for(data))
                assert "no holder could serve it" in str(info.value)
            else:
                assert await client.fetch_any([server_id], ref_for(data)) == (data, server_id)
        finally:
            await p2ps[1].remove_protobuf_handler(client.fetch_name, stream_output=True)
        assert len(calls) == 2 and not client.avoided(server_id)

    calls.clear()

    async def refuse(request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[Any]:
        calls.append(1)
        yield runtime_pb2.ExpertResponse(metadata=header(error="disk on fire"))

    await p2ps[1].add_protobuf_handler(client.fetch_name, refuse, runtime_pb2.ExpertRequest, stream_output=True)
    try:
        with pytest.raises(TransferError, match="refused"):
            await client.fetch_any([server_id], ref_for(data))
    finally:
        await p2ps[1].remove_protobuf_handler(client.fetch_name, stream_output=True)
    assert len(calls) == 1


@module_loop
async def test_a_garbage_request_gets_an_error_and_the_server_keeps_serving(p2ps: list[P2P]) -> None:
    data = os.urandom(3000)
    client, server, server_id = pair(p2ps, Holder(data))
    async with started(client, server):
        for junk in (b"\xff\x00junk", msgpack.packb({"kind": "rows"}), b""):
            answers = await p2ps[0].iterate_protobuf_handler(
                PeerID.from_base58(server_id),
                client.fetch_name,
                runtime_pb2.ExpertRequest(metadata=junk),
                runtime_pb2.ExpertResponse,
            )
            replies = [msgpack.unpackb(answer.metadata) async for answer in answers]
            assert replies == [{"error": "bad request"}]
        assert await client.fetch(server_id, ref_for(data)) == data


@module_loop
async def test_a_failing_source_answers_an_error_and_the_server_keeps_running(p2ps: list[P2P]) -> None:
    data = os.urandom(3000)
    holder = Holder(data)

    async def flaky(ref: ContentRef) -> bytes | None:
        if ref.item == "boom":
            raise OSError("disk on fire")
        return await holder(ref)

    client, server, server_id = pair(p2ps, flaky)
    async with started(client, server):
        with pytest.raises(TransferError, match="source failed") as info:
            await client.fetch(server_id, ref_for(data, item="boom"))
        assert info.value.reason == "refused" and not client.avoided(server_id)
        assert await client.fetch(server_id, ref_for(data)) == data


@module_loop
async def test_a_busy_server_says_so(p2ps: list[P2P]) -> None:
    data = os.urandom(100)
    release = asyncio.Event()

    async def slow(ref: ContentRef) -> bytes:
        await release.wait()
        return data

    client, server, server_id = pair(p2ps, slow, server_limits=limits(max_serving=1))
    async with started(client, server):
        first = asyncio.create_task(client.fetch(server_id, ref_for(data)))
        await asyncio.sleep(0.5)  # the first fetch now holds the only serving slot
        with pytest.raises(TransferError, match="busy"):
            await client.fetch(server_id, ref_for(data))
        release.set()
        assert await first == data
    assert not client.avoided(server_id)


@module_loop
async def test_unreachable_dead_and_malformed_peers_are_transfer_errors(
    dhts: list[hivemind.DHT], p2ps: list[P2P]
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    stranger = signing.peer_id_of(signing.public_key_der(key))  # a valid id nobody in the swarm has
    gone = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
    try:
        dead = str((await gone.replicate_p2p()).peer_id.to_base58())
        await asyncio.sleep(0.2)  # let the others learn its address
    finally:
        gone.shutdown()
    client, server, server_id = pair(p2ps, Holder(), timeout=3.0)
    async with started(client):  # the server never starts: its peer has no such protocol
        for peer_id in (stranger, server_id, dead, "not-a-peer-id"):
            began = time.monotonic()
            with pytest.raises(TransferError) as info:
                await client.fetch(peer_id, ref_for(b"x"))
            assert info.value.reason in ("unreachable", "timeout", "bad peer id"), info.value
            assert time.monotonic() - began < 4.0
            assert not client.avoided(peer_id)


@module_loop
async def test_a_stalling_sender_times_out(p2ps: list[P2P]) -> None:
    async def stall(request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[Any]:
        yield runtime_pb2.ExpertResponse(metadata=header(total=10))
        await asyncio.sleep(30)

    client, _, server_id = pair(p2ps, Holder(), timeout=1.0)
    await p2ps[1].add_protobuf_handler(client.fetch_name, stall, runtime_pb2.ExpertRequest, stream_output=True)
    try:
        began = time.monotonic()
        with pytest.raises(TransferError, match="timeout"):
            await client.fetch(server_id, ref_for(b"x" * 10))
        assert time.monotonic() - began < 2.0
    finally:
        await p2ps[1].remove_protobuf_handler(client.fetch_name, stream_output=True)
    assert not client.avoided(server_id) and client.stats.failed["timeout"] == 1


@module_loop
async def test_stop_is_idempotent_and_start_again_serves(p2ps: list[P2P]) -> None:
    data = os.urandom(100)
    client, server, server_id = pair(p2ps, Holder(data))
    await server.start()
    await server.stop()
    await server.stop()
    async with started(client, server):
        assert await client.fetch(server_id, ref_for(data)) == data


# --- offers --------------------------------------------------------------------------------------------------


@module_loop
async def test_an_accepted_offer_fetches_back_from_the_sender(p2ps: list[P2P]) -> None:
    data = os.urandom(4321)
    namespace = unique_namespace()
    store = Holder()
    offers: list[tuple[str, ContentRef]] = []

    async def accept(sender: str, ref: ContentRef) -> tuple[bool, str]:
        offers.append((sender, ref))
        store.contents[ref.sha256] = await receiver.fetch(sender, ref)
        return True, "stored"

    sender = ContentTransfer(p2ps[0], Holder(data), limits(), namespace=namespace)
    receiver = ContentTransfer(p2ps[1], store, limits(), namespace=namespace, on_offer=accept)
    async with started(sender, receiver):
        assert await sender.offer(receiver.peer_id, ref_for(data)) == (True, "stored")
    assert offers == [(sender.peer_id, ref_for(data))]
    assert store.contents == {ref_for(data).sha256: data}


@module_loop
async def test_an_offer_is_refused_without_an_offer_policy(p2ps: list[P2P]) -> None:
    namespace = unique_namespace()
    sender = ContentTransfer(p2ps[0], Holder(b"data"), limits(), namespace=namespace)
    receiver = ContentTransfer(p2ps[1], Holder(), limits(), namespace=namespace)
    async with started(sender, receiver):
        assert await sender.offer(receiver.peer_id, ref_for(b"data")) == (False, "offers not accepted")
    with pytest.raises(TransferError, match="unreachable"):  # stopped: nobody answers the protocol now
        await sender.offer(receiver.peer_id, ref_for(b"data"))
