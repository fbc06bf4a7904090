"""Routing over announced ranges ranked by what the client measured, the server's choice of range, blocks
records, wire checks, text pieces."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa

from garden.inference.blocks import LayerSpan
from garden.inference.client import SamplingConfig, _pick, _TextDecoder
from garden.inference.client import hidden_distance
from garden.inference.route import (
    DEFAULT_RTT,
    EXPLORE,
    MEASUREMENT_TTL,
    CoverageError,
    Measurement,
    Router,
    bounded_priors,
    guesses,
    hop_seconds,
    missing_spans,
    shortest_chain,
)
from garden.inference.server import better_span, choose_span
from garden.protocol.inference_rpc import deserialize_hidden, serialize_hidden
from garden.protocol import signing
from garden.protocol.blocks import BlocksRecord, models_subkey
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError, check_fresh
from garden.protocol.serve_spec import ServeSpec, parse_serve_spec

MODEL = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def rec(peer: str, start: int, end: int, throughput: float = 100.0, **extra: Any) -> BlocksRecord:
    fields = {
        "peer_id": peer, "model": MODEL, "start": start, "end": end, "num_layers": 30, "hidden_size": 576,
        "throughput": throughput, "free_cache_tokens": 1000, "max_sessions": 4, "max_session_tokens": 512,
        "announced_at": 1000.0,
    } | extra  # fmt: skip
    return BlocksRecord.model_validate(fields)


def test_the_chain_covers_every_layer_at_least_cost() -> None:
    records = [
        rec("A", 0, 10),
        rec("B", 10, 20, 10.0),
        rec("C", 10, 20, 100.0),
        rec("D", 20, 30),
        rec("E", 0, 30, 50.0),
    ]
    chain = shortest_chain(records, MODEL, LayerSpan(0, 30))
    assert [(h.peer_id, str(h.span)) for h in chain] == [("A", "0-10"), ("C", "10-20"), ("D", "20-30")]
    # a slow server holding everything wins when the round trips to the others are long
    far = {p: Measurement(rtt=1.0) for p in "ACD"}
    assert [h.peer_id for h in shortest_chain(records, MODEL, LayerSpan(0, 30), far)] == ["E"]
    # a sub-range of a server's range
    assert [(h.peer_id, str(h.span)) for h in shortest_chain(records[:4], MODEL, LayerSpan(12, 20))] == [("C", "12-20")]


def test_an_announcement_is_only_a_bounded_prior() -> None:
    """1e9 announced earns a never-measured server the median of the others' announcements, no more."""
    honest = [rec("A", 0, 10), rec("B", 10, 20), rec("D", 20, 30)]
    liar = rec("H", 10, 20, 1e9)
    priors = bounded_priors([*honest, liar, rec("S", 10, 20, 40.0)])
    assert priors == {"A": 100.0, "B": 100.0, "D": 100.0, "H": 100.0, "S": 40.0}  # a slower claim is kept
    assert bounded_priors([liar]) == {"H": 1e9}  # alone: nothing to compare with, and no route to win
    # before any measurement the liar is assumed what an honest server of its layers is: a tie, not a win
    assumed = guesses([*honest, liar], {})
    assert assumed["H"] == assumed["B"] == Measurement(rtt=DEFAULT_RTT, layer_seconds=0.01)
    # trusting announcements, it would have cost a millionth of the honest server's compute
    trusted = Measurement(rtt=DEFAULT_RTT, layer_seconds=1e-9)
    assert hop_seconds(10, trusted) < hop_seconds(10, assumed["B"]) / 3


def test_measured_speed_ranks_servers_not_announcements() -> None:
    records = [rec("A", 0, 10), rec("B", 10, 20, 100.0), rec("H", 10, 20, 1e9), rec("D", 20, 30)]
    span = LayerSpan(0, 30)
    # both measured at the same round trip; the liar is 10 % slower per layer: it loses, whatever it announced
    measured = {"B": Measurement(rtt=0.002, layer_seconds=0.010), "H": Measurement(rtt=0.002, layer_seconds=0.011)}
    assert [h.peer_id for h in shortest_chain(records, MODEL, span, measured)] == ["A", "B", "D"]
    # measured faster, it wins: ranking follows what was measured, and the spot check is what catches a liar
    measured["H"] = Measurement(rtt=0.002, layer_seconds=0.009)
    assert [h.peer_id for h in shortest_chain(records, MODEL, span, measured)] == ["A", "H", "D"]
    # a server not measured yet is tried before routes settle on a measured one, even one that announces less
    # than that one did in the client's measurement (announcements are not on the client's scale)
    slow_claim = [rec("A", 0, 10), rec("B", 10, 20, 10.0), rec("H", 10, 20, 1e9), rec("D", 20, 30)]
    first = {"H": Measurement(rtt=0.002, layer_seconds=0.02)}
    assert [h.peer_id for h in shortest_chain(slow_claim, MODEL, span, first)] == ["A", "B", "D"]
    assumed = guesses(slow_claim, first)["B"]
    assert assumed.layer_seconds == pytest.approx(EXPLORE * 0.02) and assumed.rtt == 0.002
    assert hop_seconds(10, assumed, Measurement(layer_seconds=0.05)) == pytest.approx(0.002 + 0.5)


def router_with(records: list[BlocksRecord]) -> Router:
    router = Router(swarm=None, keys=DHTKeys(), model=MODEL, refresh_s=1e9)
    router._cache = (1e18, records)  # never read the DHT
    return router


def test_the_router_measures_round_trips_and_seconds_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("garden.inference.route.time.monotonic", lambda: now[0])
    router = router_with([])
    router.measured("B", 0.002)  # open: no layers, a round trip
    router.measured("B", 0.052, layers=10, tokens=1)  # one decode step over 10 layers
    m = router.current()["B"]
    assert m.rtt == pytest.approx(0.002) and m.layer_seconds == pytest.approx(0.005)
    router.measured("B", 2.0, layers=10, tokens=200)  # a prompt or a replay: not what a chain repeats
    assert router.current()["B"].layer_seconds == pytest.approx(0.005)
    router.measured("B", 0.102, layers=10, tokens=1)  # smoothed: one slow step moves it a fifth of the way
    assert router.current()["B"].layer_seconds == pytest.approx(0.8 * 0.005 + 0.2 * 0.010)
    router.measured("B", 0.012)
    assert router.current()["B"].rtt == pytest.approx(0.8 * 0.002 + 0.2 * 0.012)
    # not renewed for the TTL: forgotten, so the server is tried again at its prior
    now[0] += MEASUREMENT_TTL + 1
    assert "B" not in router.current()
    router.measured("B", 0.004)
    assert router.current()["B"] == Measurement(rtt=0.004, layer_seconds=None) and router.current()["B"].at == now[0]


def test_a_pushed_step_measures_the_layers_of_a_server_in_the_middle_of_a_chain() -> None:
    """Its time (between the answers of the server before it and its own) is all layers: no round trip of its own
    is in it, and the round trip measured by its calls stays as it was."""
    router = router_with([])
    router.measured("B", 0.002)
    router.measured_pushed("B", 0.05, layers=10)
    assert router.current()["B"] == Measurement(rtt=0.002, layer_seconds=0.005)
    router.measured_pushed("B", 0.15, layers=10)
    assert router.current()["B"].layer_seconds == pytest.approx(0.8 * 0.005 + 0.2 * 0.015)
    router.measured_pushed("C", -0.001, layers=10)  # answers timed out of order: nothing below zero
    router.measured_pushed("D", 0.05, layers=0)
    assert router.current()["C"].layer_seconds == 0.0 and "D" not in router.current()


async def test_banned_servers_are_left_out_and_liars_remembered() -> None:
    records = [rec("A", 0, 10), rec("B", 10, 20), rec("H", 10, 20, 1e9), rec("D", 20, 30)]
    router = router_with(records)
    router.ban("H", 3600.0, lied="its hidden states differ")
    router._cache = (1e18, records)  # ban() drops the cache (the record may be gone): put it back
    assert [r.peer_id for r in await router.servers()] == ["A", "B", "D"]
    assert router.banned("H") and router.liars == {"H": "its hidden states differ"}
    router.ban("H", 1.0)  # a shorter ban never shortens a longer one
    assert router.banned("H") and not router.banned("B")


@pytest.mark.swarm  # a hivemind DHT node (its p2pd): `make test`, not `make check`
async def test_a_gap_in_the_records_in_hand_is_read_again_before_it_is_reported() -> None:
    """The router reuses one read of the records for ``refresh_s``: a server that announced since that read (or
    that a read on a loaded machine missed) is no gap, and a request is not refused for it; a gap still there in a
    fresh read is named."""
    import asyncio

    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    keys, dht = DHTKeys(), hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        signers = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in range(3)]
        peers = [signing.peer_id_of(signing.public_key_der(k)) for k in signers]
        now = get_dht_time()
        records = [rec(p, 10 * i, 10 * i + 10, announced_at=now) for i, p in enumerate(peers)]

        def announce(count: int) -> None:
            for record, signer in list(zip(records, signers, strict=True))[:count]:
                assert dht.store(keys.model_blocks(MODEL), record.to_wire(signer), now + 60, subkey=record.peer_id)

        class Reads:  # what the router asks of garden's Swarm: a read of the DHT
            reads = 0

            async def get(self, key: str, latest: bool = False) -> Any:
                Reads.reads += 1
                return await asyncio.to_thread(dht.get, key, latest)

        announce(3)
        router = Router(swarm=Reads(), keys=keys, model=MODEL, refresh_s=1e9)  # the records in hand never expire
        router._cache = (0.0, records[:2])  # read before the server of layers 20-30 announced
        chain = await router.chain()
        assert [hop.peer_id for hop in chain] == peers and Reads.reads == 1
        assert [hop.peer_id for hop in await router.chain()] == peers and Reads.reads == 1  # that read is reused
        # a gap still there in a fresh read: nobody announced layers 20-30 (in another swarm, under its keys)
        keys = DHTKeys(swarm="other")
        announce(2)
        router = Router(swarm=Reads(), keys=keys, model=MODEL, refresh_s=1e9)
        router._cache = (0.0, records[:2])
        with pytest.raises(CoverageError, match="20-30"):
            await router.chain()
        assert Reads.reads == 2
    finally:
        dht.shutdown()


def test_a_gap_is_named() -> None:
    records = [rec("A", 0, 10), rec("D", 20, 30)]
    assert missing_spans(records, 30) == [LayerSpan(10, 20)]
    with pytest.raises(CoverageError, match="10-20"):
        shortest_chain(records, MODEL, LayerSpan(0, 30))


def test_a_server_picks_the_least_covered_layers() -> None:
    assert choose_span([], 30, 10) == LayerSpan(0, 10)
    assert choose_span([rec("A", 0, 10)], 30, 10) == LayerSpan(10, 20)
    assert choose_span([rec("A", 0, 10), rec("B", 10, 20)], 30, 10) == LayerSpan(20, 30)
    full = [rec("A", 0, 10), rec("B", 10, 20, 50.0), rec("C", 20, 30)]
    assert choose_span(full, 30, 10) == LayerSpan(10, 20)  # all held once: the slowest range
    assert choose_span([rec("me", 0, 10)], 30, 10, exclude="me") == LayerSpan(0, 10)
    assert choose_span([], 30, 99) == LayerSpan(0, 30)


def test_a_liars_announcement_does_not_push_servers_off_its_layers() -> None:
    """Each range held once; the 0-10 server claims 1e9. Counted at the median, its range ties with the
    others (the first is taken) instead of looking best served and being left to it alone."""
    records = [rec("H", 0, 10, 1e9), rec("A", 10, 20, 200.0), rec("B", 20, 30, 200.0)]
    assert choose_span(records, 30, 10) == LayerSpan(0, 10)


def test_hidden_distance_is_relative_and_per_token() -> None:
    torch.manual_seed(0)
    a = torch.randn(1, 5, 64) * torch.tensor([1.0, 100.0, 1.0, 1000.0, 1.0]).view(1, 5, 1)
    assert hidden_distance(a, a.clone()) == 0.0
    assert hidden_distance(a, a.half().float()) < 1e-3  # the wire's rounding
    forged = a.clone()
    forged[0, 2] += torch.randn(64) * 0.1 * a[0, 2].norm() / 8  # one small-scale token, ~10 % off
    assert 0.05 < hidden_distance(a, forged) < 0.2  # not averaged away by the large tokens
    assert hidden_distance(a, torch.zeros_like(a)) == pytest.approx(1.0)
    assert hidden_distance(a, a[:, :4]) == float("inf")


def test_a_redundant_server_moves_to_a_gap_only() -> None:
    mine = LayerSpan(0, 10)
    both = [rec("me", 0, 10), rec("A", 0, 10), rec("B", 10, 20)]
    assert better_span(both, "me", mine, 30) == LayerSpan(20, 30)  # 0-10 held twice, 20-30 by no one
    alone = [rec("me", 0, 10), rec("B", 10, 20)]
    assert better_span(alone, "me", mine, 30) is None  # it is the only server of its layers: it stays
    full = [rec("me", 0, 10), rec("A", 0, 10), rec("B", 10, 20), rec("C", 20, 30)]
    assert better_span(full, "me", mine, 30) is None  # no gap: no reason to move


def test_blocks_records_are_sealed_and_checked(key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    peer = signing.peer_id_of(signing.public_key_der(key))
    good = rec(peer, 0, 10)
    assert BlocksRecord.from_wire(good.to_wire(key), peer) == good
    assert BlocksRecord.from_wire(good.to_wire(key), models_subkey(good), index=True) == good
    with pytest.raises(RecordError, match="signed by"):
        BlocksRecord.from_wire(good.to_wire(other), peer)  # announced in another's name
    with pytest.raises(RecordError, match="stored under"):
        BlocksRecord.from_wire(good.to_wire(key), "someone-else")
    with pytest.raises(RecordError):
        BlocksRecord.from_wire(b"\x00garbage", peer)
    with pytest.raises(ValueError, match="not within"):
        rec(peer, 10, 40)
    with pytest.raises(RecordError, match="claims to live"):
        check_fresh(1000.0, 1000.0 + 10 * 24 * 3600, 1000.0)  # a forged long life


def test_hidden_states_from_a_stranger_are_checked() -> None:
    ok = serialize_hidden(torch.randn(1, 3, 8), "bfloat16")
    assert deserialize_hidden(ok, 8, 4).shape == (1, 3, 8)
    with pytest.raises(RecordError, match="expected"):
        deserialize_hidden(ok, 8, 2)  # more tokens than allowed
    with pytest.raises(RecordError, match="non-finite"):
        deserialize_hidden(serialize_hidden(torch.full((1, 1, 8), float("inf")), "float32"), 8, 4)
    broken = serialize_hidden(torch.randn(1, 3, 8), "float32")
    broken.buffer = broken.buffer[:7]
    with pytest.raises(RecordError, match="undecodable"):
        deserialize_hidden(broken, 8, 4)


class _Chars:
    """A tokenizer whose tokens are characters (ids are code points)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_text_pieces_hold_back_a_possible_stop_string() -> None:
    decoder = _TextDecoder(_Chars(), ("STOP",))
    out = []
    for ch in "Hello STand STOP more":
        piece, stopped = decoder.add(ord(ch))
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == "Hello STand " and stopped
    assert "ST" not in out[6] if len(out) > 6 else True


def test_sampling_is_seeded_and_top_p_cuts_the_tail() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -5.0])
    greedy = SamplingConfig(temperature=0)
    assert _pick(logits, greedy, torch.Generator().manual_seed(0)) == 0
    narrow = SamplingConfig(temperature=1.0, top_p=0.5)
    assert {_pick(logits, narrow, torch.Generator().manual_seed(s)) for s in range(20)} == {0}
    wide = SamplingConfig(temperature=1.0, top_p=1.0)
    draws = [_pick(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == [_pick(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)] and len(set(draws)) > 1


def test_serve_values() -> None:
    assert parse_serve_spec("builtin:smollm2-135m").start is None
    spec = parse_serve_spec("builtin:smollm2-135m:0-15")
    assert (spec.model, spec.start, spec.end) == ("builtin:smollm2-135m", 0, 15)
    assert parse_serve_spec("HuggingFaceTB/SmolLM2-135M-Instruct:3-9").model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the swarm's students: by a prefix, a whole id or a mission's name, with or without a range
    assert parse_serve_spec("mission:0a1b2c3d") == ServeSpec("mission:0a1b2c3d")
    assert parse_serve_spec(f"mission:{'ab' * 32}:0-5") == ServeSpec(f"mission:{'ab' * 32}", 0, 5)
    assert str(parse_serve_spec("mission:capitals:2-10")) == "mission:capitals:2-10"
    with pytest.raises(ValueError, match="empty"):
        parse_serve_spec("builtin:smollm2-135m:5-5")
