"""The invite line: made by a peer, pasted by a newcomer; and the bootstrap peers a peer remembers."""

from __future__ import annotations

import pytest

from garden.config import GardenSettings
from garden.net.directory import PeerEntry, bootstrap_peers, remembered_peers
from garden.protocol.invite import INVITE_PREFIX, Invite, parse_invite
from garden.protocol.records import PeerInfo

A = "Qm" + "a" * 44
B = "Qm" + "b" * 44
LEAD = "12D3KooW" + "c" * 44


def test_an_invite_line_round_trips_and_a_damaged_one_says_so() -> None:
    invite = Invite(swarm="garden-test", peers=[f"/ip4/203.0.113.7/tcp/31337/p2p/{A}"], leads=[LEAD])
    line = invite.line()
    assert line.startswith(INVITE_PREFIX) and " " not in line and "," not in line and len(line) < 200
    assert parse_invite(line) == invite and parse_invite(f"  {line}\n") == invite
    for damaged in (line[:-10], line + line, line.replace(INVITE_PREFIX, INVITE_PREFIX + "!"), INVITE_PREFIX):
        with pytest.raises(ValueError, match="damaged"):
            parse_invite(damaged)
    with pytest.raises(ValueError):  # a peer address without its peer id cannot be dialled safely
        Invite(swarm="s", peers=["/ip4/203.0.113.7/tcp/31337"])


def test_garden_run_join_takes_an_invite_line() -> None:
    line = Invite(swarm="garden-test", peers=[f"/ip4/203.0.113.7/tcp/1/p2p/{A}"], leads=[LEAD]).line()
    settings = GardenSettings(join=[line, f"/ip4/198.51.100.1/tcp/2/p2p/{B}"], trust_lead=[B])
    assert settings.join == [f"/ip4/198.51.100.1/tcp/2/p2p/{B}", f"/ip4/203.0.113.7/tcp/1/p2p/{A}"]
    assert settings.swarm == "garden-test" and settings.trust_lead == sorted([LEAD, B])
    assert GardenSettings(join=line).join == [f"/ip4/203.0.113.7/tcp/1/p2p/{A}"]  # GARDEN_JOIN, a config key
    with pytest.raises(ValueError, match="invite is for swarm 'garden-test'"):
        GardenSettings(join=[line], swarm="another")
    with pytest.raises(ValueError, match="damaged"):
        GardenSettings(join=[line[:-5]])


def _entry(peer_id: str, addresses: list[str], reachability: str = "public", seen: float = 100.0,
           client_mode: bool = False) -> PeerEntry:  # fmt: skip
    info = PeerInfo(
        peer_id=peer_id, version="x", roles=[], cores=1, ram_bytes=0, load=0.0, addresses=addresses,
        client_mode=client_mode, reachability=reachability, announced_at=seen,
    )  # fmt: skip
    return PeerEntry(info, seen + 60)


def test_the_remembered_bootstrap_peers_are_the_ones_others_can_dial() -> None:
    me, private, client, unknown = ("Qm" + c * 44 for c in "mpcu")
    entries = [
        _entry(me, [f"/ip4/10.0.0.9/tcp/1/p2p/{me}"]),
        _entry(private, [f"/ip4/10.0.0.1/tcp/1/p2p/{A}/p2p-circuit/p2p/{private}"], "private"),
        _entry(client, [], "unknown", client_mode=True),
        _entry(unknown, [f"/ip4/10.0.0.5/tcp/5/p2p/{unknown}"], "unknown", seen=300.0),
        _entry(A, [f"/ip4/127.0.0.1/tcp/1/p2p/{A}", f"/ip4/10.0.0.1/tcp/1/p2p/{A}"], seen=100.0),
        _entry(B, [f"/ip4/127.0.0.1/tcp/2/p2p/{B}"], seen=200.0),  # a swarm on one machine: loopback it is
    ]
    assert bootstrap_peers(entries, me) == [
        f"/ip4/10.0.0.1/tcp/1/p2p/{A}", f"/ip4/127.0.0.1/tcp/2/p2p/{B}", f"/ip4/10.0.0.5/tcp/5/p2p/{unknown}",
    ]  # fmt: skip
    assert len(bootstrap_peers(entries, me, limit=1)) == 1
    # a crowd of new identities announcing every second does not push out the peers known longest
    sybils = [_entry(f"Qm{i:02d}" + "s" * 42, [f"/ip4/10.6.6.{i}/tcp/1/p2p/Qm{i:02d}" + "s" * 42], seen=999.0)
              for i in range(10)]  # fmt: skip
    first_seen = {A: 1.0, B: 2.0, **{e.info.peer_id: 500.0 for e in sybils}}
    kept = bootstrap_peers(entries + sybils, me, first_seen=first_seen)
    assert kept[:2] == [f"/ip4/10.0.0.1/tcp/1/p2p/{A}", f"/ip4/127.0.0.1/tcp/2/p2p/{B}"] and len(kept) == 8


def test_a_read_that_misses_a_peer_does_not_make_a_restart_forget_it() -> None:
    a, b, c = (f"/ip4/10.0.0.{i}/tcp/4000/p2p/{peer}" for i, peer in enumerate(("QmA", "QmB", "QmC"), start=1))
    assert remembered_peers([a], [a, b]) == [a, b]  # b missing from this read: still remembered, after a
    assert remembered_peers([c, a], [a, b]) == [c, a, b]  # what the read found first, in its order
    assert remembered_peers([], [a]) == [a]
    assert remembered_peers([a, b, c], [], limit=2) == [a, b]
    assert remembered_peers([c], [a, b], limit=2) == [c, a]  # full: the memory's last is dropped first
