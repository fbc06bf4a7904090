"""Spot checks of servers' hidden states, in one process: real block servers (``BlockServer``'s RPC handlers
on a tiny random Llama), a real ``ChainSession`` and ``Router`` (reading signed records), and a P2P stand-in
that hands each call to the server it names. One server adds noise to what it returns.

Which server the chain picks, and which witness a check asks, are set by the test (measurements and a picker
in place of the session's random draws), so each rule of the verdict is exercised on purpose.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils import get_dht_time

from garden.inference.blocks import Blocks, LayerSpan
from garden.inference.client import (
    DISAGREED,
    LIAR_BAN_SECONDS,
    SPOT_TOLERANCE,
    SUSPECT_BAN_SECONDS,
    ChainConfig,
    ChainSession,
    hidden_distance,
)
from garden.inference.route import Measurement, Router
from garden.inference.server import BlockServer, ServeConfig
from garden.models.loading import parse_model_ref
from garden.protocol import signing
from garden.protocol.blocks import BlocksRecord
from garden.protocol.inference_rpc import BlocksRpcError
from garden.protocol.keys import DHTKeys

MODEL = "builtin:smollm2-135m"  # the name on the records; the weights are a tiny random Llama
HIDDEN, LAYERS = 16, 4


def tiny_config() -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture(scope="module")
def weights() -> list[dict[str, torch.Tensor]]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    return [LlamaDecoderLayer(tiny_config(), layer_idx=i).state_dict() for i in range(LAYERS)]


class NoisyBlocks(Blocks):
    """What a hostile server runs: the real layers, then noise (10 % of each token's spread) on the answer."""

    def forward(self, hidden: Any, cache: Any, sub: LayerSpan | None = None) -> Any:
        out = super().forward(hidden, cache, sub)
        return out + 0.1 * out.std(dim=-1, keepdim=True) * torch.randn(out.shape)


def blocks(weights: list[dict[str, torch.Tensor]], span: LayerSpan, noisy: bool = False) -> Blocks:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = tiny_config()
    layers = torch.nn.ModuleList()
    for i in range(span.start, span.end):
        layer = LlamaDecoderLayer(config, layer_idx=i - span.start)
        layer.load_state_dict(weights[i])
        layers.append(layer)
    kind = NoisyBlocks if noisy else Blocks
    return kind(parse_model_ref(MODEL), config, span, layers.eval(), LlamaRotaryEmbedding(config).eval())


@dataclass
class Peer:
    name: str
    key: rsa.RSAPrivateKey
    peer_id: str
    server: BlockServer | None = None


class FakeP2P:
    """Hands a call to the named peer's server handlers, as the client's peer (hivemind's P2P does this over
    libp2p); a peer without a server is unreachable."""

    def __init__(self, me: Peer, peers: dict[str, Peer]) -> None:
        self.me, self.peers = me, peers
        self.peer_id = PeerID.from_base58(me.peer_id)
        self.calls: list[tuple[str, str]] = []  # (peer name, RPC)

    async def call_protobuf_handler(self, peer: PeerID, name: str, request: Any, response_type: Any) -> Any:
        target = self.peers[peer.to_base58()]
        if target.server is None:
            raise ConnectionError("no such peer")
        op = name.rsplit(".", 1)[1]
        self.calls.append((target.name, op))
        context = P2PContext(handle_name=name, local_id=peer, remote_id=self.peer_id)
        return await getattr(target.server, f"rpc_{op}")(request, context)


class FakeSwarm:
    """The DHT read a router does: every server's signed record under the model's key."""

    def __init__(self) -> None:
        self.value: dict[str, tuple[bytes, float]] = {}

    def announce(self, peer: Peer, span: LayerSpan) -> None:
        record = BlocksRecord(
            peer_id=peer.peer_id, model=MODEL, start=span.start, end=span.end, num_layers=LAYERS, hidden_size=HIDDEN,
            throughput=1e9 if peer.name == "H" else 100.0, free_cache_tokens=4096, max_sessions=8,
            max_session_tokens=1024, announced_at=get_dht_time(),
        )  # fmt: skip
        self.value[peer.peer_id] = (record.to_wire(peer.key), get_dht_time() + 600)

    async def get(self, key: str, latest: bool = False) -> Any:
        return SimpleNamespace(value=dict(self.value))


class Picker:
    """Stands in for the session's random draws: every step is checked, witnesses are taken in the order
    the test prefers (by peer name)."""

    def __init__(self, names: dict[str, str], prefer: Sequence[str], check: Sequence[bool] = ()) -> None:
        self.names, self.prefer, self.check = names, list(prefer), list(check)

    def random(self) -> float:
        return (0.0 if self.check.pop(0) else 1.0) if self.check else 0.0

    def choice(self, records: Sequence[BlocksRecord]) -> BlocksRecord:
        return min(records, key=lambda r: self.prefer.index(self.names[r.peer_id]))


def serve(peer: Peer, dht: FakeSwarm, layers: Blocks) -> BlockServer:
    """A real block server's RPC handlers over ``layers`` (started without loading anything)."""
    config = ServeConfig(model=MODEL, span=layers.span)
    server = BlockServer(None, dht, DHTKeys(), peer.key, peer.peer_id, config)  # type: ignore[arg-type]
    server.blocks = layers
    return server


@dataclass
class Swarm:
    peers: dict[str, Peer]  # by name
    layout: dict[str, tuple[int, int]]  # each server's layers
    dht: FakeSwarm
    p2p: FakeP2P
    router: Router
    names: dict[str, str]  # peer id -> name
    reference: list[Blocks]  # an honest chain covering every layer, in order

    def id(self, name: str) -> str:
        return self.peers[name].peer_id

    def announce(self, *names: str) -> None:
        for name in names:
            self.dht.announce(self.peers[name], LayerSpan(*self.layout[name]))
        self.router._cache = None

    def ban_left(self, name: str) -> float:
        """Seconds the router still leaves ``name`` out."""
        return self.router._banned[self.id(name)] - time.monotonic()

    def session(
        self, prefer: Sequence[str], check: Sequence[bool] = (), spot_check: float = 1.0, push: bool = True
    ) -> ChainSession:
        config = ChainConfig(spot_check=spot_check, push=push)
        session = ChainSession(self.p2p, self.router, HIDDEN, 128, config)  # type: ignore[arg-type]
        session._rng = Picker(self.names, prefer, check)  # type: ignore[assignment]
        return session

    def prefer_route(self, *names: str) -> None:
        """Make the chain go through ``names``: they were measured fast, everyone else slow."""
        self.router.measurements = {
            peer.peer_id: Measurement(rtt=1e-4, layer_seconds=1e-6) if name in names else Measurement(1.0, 1.0)
            for name, peer in self.peers.items()
        }


@pytest.fixture
async def swarm(weights: list[dict[str, torch.Tensor]]) -> AsyncIterator[Swarm]:
    layout = {"A": (0, 2), "B1": (2, 4), "B2": (2, 4), "B3": (2, 4), "H": (2, 4)}
    dht = FakeSwarm()
    peers: dict[str, Peer] = {}
    for name in ["me", *layout]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        peers[name] = Peer(name, key, signing.peer_id_of(signing.public_key_der(key)))
    for name, (start, end) in layout.items():
        peer, span = peers[name], LayerSpan(start, end)
        peer.server = serve(peer, dht, blocks(weights, span, noisy=name == "H"))
    by_id = {p.peer_id: p for p in peers.values()}
    for peer in peers.values():
        if peer.server is not None:
            peer.server.p2p = FakeP2P(peer, by_id)  # type: ignore[assignment]  # its pushes to the next server
    p2p = FakeP2P(peers["me"], by_id)
    router = Router(dht, DHTKeys(), MODEL)
    reference = [blocks(weights, LayerSpan(0, 2)), blocks(weights, LayerSpan(2, 4))]
    state = Swarm(peers, layout, dht, p2p, router, {p.peer_id: p.name for p in peers.values()}, reference)
    try:
        yield state
    finally:
        for peer in peers.values():
            if peer.server is not None:
                await peer.server.stop()


def honest(reference: list[Blocks], steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """What an honest chain answers for each step (float16 on the wire at every boundary, as the client
    sends and the servers answer)."""
    caches = [b.new_cache() for b in reference]
    answers = []
    for step in steps:
        hidden = step.half().float()
        for part, cache in zip(reference, caches, strict=True):
            hidden = part.forward(hidden, cache).half().float()
        answers.append(hidden)
    return answers


def inputs(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 5 if i == 0 else 1, HIDDEN, generator=generator) for i in range(n)]


async def run(session: ChainSession, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    await session.open()
    try:
        return [await session.step(step) for step in steps]
    finally:
        await session.close()


def chain_names(swarm: Swarm, session: ChainSession) -> list[str]:
    return [swarm.names[h.peer_id] for h in session.hops]


async def test_a_liar_outvoted_by_a_referee_is_banned_and_its_step_run_again(swarm: Swarm) -> None:
    swarm.announce("A", "B1", "B2", "H")
    swarm.prefer_route("A", "H")  # the liar is on the route (as if it had won it)
    session = swarm.session(prefer=["B1", "B2"])
    steps = inputs()
    await session.open()
    assert chain_names(swarm, session) == ["A", "H"]
    answers = [await session.step(step) for step in steps]
    route = chain_names(swarm, session)
    await session.close()
    # B1 disagreed with H at the first step, B2 refereed and sided with B1: H banned, the step ran on B1
    assert session.caught == [swarm.id("H")] and set(swarm.router.liars) == {swarm.id("H")}
    assert swarm.router.banned(swarm.id("H")) and not swarm.router.banned(swarm.id("B1"))
    assert route[0] == "A" and route[1] in ("B1", "B2") and session.failovers == 1
    for got, want in zip(answers, honest(swarm.reference, steps), strict=True):
        assert hidden_distance(got, want) < SPOT_TOLERANCE / 10
    assert swarm.router.checks["disagreed"] == 1 and swarm.router.checks["agreed"] == len(steps)
    # every session and probe was closed on every server
    assert all(not p.server.sessions for p in swarm.peers.values() if p.server is not None)
    assert swarm.ban_left("H") > LIAR_BAN_SECONDS - 60  # the long ban


async def test_a_lying_witness_is_banned_and_the_hops_answer_stands(swarm: Swarm) -> None:
    swarm.announce("A", "B1", "B2", "H")
    swarm.prefer_route("A", "B1")
    session = swarm.session(prefer=["H", "B2"])  # H is asked as the witness, B2 referees
    steps = inputs(2)
    answers = await run(session, steps)
    assert session.caught == [swarm.id("H")] and session.failovers == 0
    assert swarm.router.liars.keys() == {swarm.id("H")}
    for got, want in zip(answers, honest(swarm.reference, steps), strict=True):
        assert hidden_distance(got, want) < SPOT_TOLERANCE / 10


async def test_two_servers_that_disagree_with_no_referee_are_both_banned(swarm: Swarm) -> None:
    swarm.announce("A", "B1", "H")
    swarm.prefer_route("A", "H")
    session = swarm.session(prefer=["B1"])
    with pytest.raises(BlocksRpcError) as raised:
        await run(session, inputs(1))
    # nobody can tell which of the two lied: both are left out for a while, and the layers have no server left
    assert raised.value.code == DISAGREED and "no server holds layers 2-4" in raised.value.detail
    assert set(session.caught) == {swarm.id("H"), swarm.id("B1")}
    for name in ("H", "B1"):
        assert SUSPECT_BAN_SECONDS - 60 < swarm.ban_left(name) <= SUSPECT_BAN_SECONDS
    assert "no third server" in swarm.router.liars[swarm.id("B1")]


async def test_a_liar_caught_late_has_the_next_hops_rebuilt(swarm: Swarm, weights: list) -> None:
    """The liar's unchecked answer to the prompt already went into the next hop's cache: that hop is rebuilt
    from the client's history too, so every answer from the catch on is the honest one."""
    layout = {"A": (0, 1), "H": (1, 3), "B1": (1, 3), "B2": (1, 3), "C": (3, 4)}
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    c = swarm.peers["C"] = Peer("C", key, signing.peer_id_of(signing.public_key_der(key)))
    swarm.names[c.peer_id], swarm.p2p.peers[c.peer_id] = "C", c
    swarm.dht.value.clear()
    for name, (start, end) in layout.items():
        peer, span = swarm.peers[name], LayerSpan(start, end)
        if peer.server is not None:
            await peer.server.stop()
        peer.server = BlockServer(
            None, swarm.dht, DHTKeys(), peer.key, peer.peer_id, ServeConfig(model=MODEL, span=span)
        )  # type: ignore[arg-type]
        peer.server.blocks = blocks(weights, span, noisy=name == "H")
    swarm.layout = layout
    swarm.announce(*layout)
    swarm.prefer_route("A", "H", "C")
    steps = inputs(4)
    session = swarm.session(prefer=["B1", "B2"], check=[False, False])  # the prompt goes unchecked on A and H
    await session.open()
    assert chain_names(swarm, session) == ["A", "H", "C"]
    answers = [await session.step(step) for step in steps]
    route = chain_names(swarm, session)
    await session.close()
    want = honest([blocks(weights, LayerSpan(*layout[n])) for n in ("A", "B1", "C")], steps)
    assert hidden_distance(answers[0], want[0]) > 10 * SPOT_TOLERANCE  # the liar's noise got through, unchecked
    for got, expected in zip(answers[1:], want[1:], strict=True):
        assert hidden_distance(got, expected) < SPOT_TOLERANCE / 10  # from the catch on: honest again
    assert session.caught == [swarm.id("H")] and route[1] in ("B1", "B2") and route[2] == "C"
    # C was opened again (a new session, replayed with the honest states), not only H replaced
    assert swarm.p2p.calls.count(("C", "open")) == 2
    for peer in swarm.peers.values():
        if peer.server is not None:
            assert not peer.server.sessions, peer.name


async def test_no_check_without_a_second_server_and_none_when_off(swarm: Swarm) -> None:
    swarm.announce("A", "B1")
    steps = inputs(2)
    answers = await run(swarm.session(prefer=[]), steps)
    assert swarm.router.checks["no second server"] == 2 * len(steps)  # each hop, each step
    swarm.announce("B2")
    off = swarm.session(prefer=[], spot_check=0.0)
    off._rng = random.Random(0)
    swarm.p2p.calls.clear()
    again = await run(off, steps)
    assert off.spot_checks == 0 and [op for _, op in swarm.p2p.calls].count("forward") == 2 * len(steps)
    for got, want in zip(again, answers, strict=True):
        assert hidden_distance(got, want) < SPOT_TOLERANCE / 10


class TwoFacedServer(BlockServer):
    """Answers its client with the honest output and pushes noise on to the next server: the client, comparing
    what the next server ran with what this one answered, catches it (nothing else would, with checks off)."""

    def _push(self, meta: Any, wire: Any) -> None:
        from garden.protocol.inference_rpc import deserialize_hidden, serialize_hidden

        true = deserialize_hidden(wire, HIDDEN, 1)
        super()._push(meta, serialize_hidden(true + torch.randn(true.shape), "float16"))


async def test_pushed_steps_go_server_to_server_and_answer_as_hop_by_hop(swarm: Swarm) -> None:
    """Decoding steps with the servers pushing to each other: the same answers as steps that come back to the
    client between hops, with every hop's history kept here (for fail-over), and one forward call per hop."""
    swarm.announce("A", "B1")
    steps = inputs(4)
    session = swarm.session(prefer=[], spot_check=0.0)
    answers = await run(session, steps)
    assert session.pushed_steps == len(steps) - 1  # the 5-token prompt goes hop by hop
    assert swarm.peers["A"].server.stats.pushed == len(steps) - 1  # type: ignore[union-attr]
    assert [op for _, op in swarm.p2p.calls].count("forward") == 2 * len(steps)
    assert [op for _, op in swarm.p2p.calls].count("push") == 0  # the servers push, never the client
    # the server in the middle was timed by its pushed steps (its prompt measures nothing): routes judge it by
    # its speed, not by what it announces
    assert swarm.router.current()[swarm.peers["B1"].peer_id].layer_seconds is not None
    for got, want in zip(answers, honest(swarm.reference, steps), strict=True):
        assert hidden_distance(got, want) < SPOT_TOLERANCE / 10
    patient = ChainSession(swarm.p2p, swarm.router, HIDDEN, 128, ChainConfig(call_timeout=600.0))  # type: ignore[arg-type]
    assert all(torch.equal(x, y) for x, y in zip(await run(patient, steps), answers, strict=True))
    assert patient.pushed_steps == len(steps) - 1  # a push waits at most 60 s, whatever the client's own timeout
    hop_by_hop = swarm.session(prefer=[], spot_check=0.0, push=False)
    again = await run(hop_by_hop, steps)
    assert hop_by_hop.pushed_steps == 0 and all(torch.equal(x, y) for x, y in zip(again, answers, strict=True))


async def test_a_server_that_pushes_other_states_than_it_answers_is_caught_and_pushing_stops(
    swarm: Swarm, weights: list
) -> None:
    a = swarm.peers["A"]
    two_faced = TwoFacedServer(None, swarm.dht, DHTKeys(), a.key, a.peer_id, ServeConfig(model=MODEL, span=LayerSpan(0, 2)))  # type: ignore[arg-type]  # noqa: E501
    two_faced.blocks, two_faced.p2p = blocks(weights, LayerSpan(0, 2)), a.server.p2p  # type: ignore[union-attr]
    a.server = two_faced
    swarm.announce("A", "B1", "B2")
    steps = inputs(4)
    session = swarm.session(prefer=[], spot_check=0.0)
    answers = await run(session, steps)
    assert not session.push and session.pushed_steps == 0 and session.failovers == 1
    for got, want in zip(answers, honest(swarm.reference, steps), strict=True):  # the B hop rebuilt from the history
        assert hidden_distance(got, want) < SPOT_TOLERANCE / 10
    await two_faced.stop()
