"""The reach check's messages (``<swarm>.reach``, ``garden.net.reach``): "can you dial me back?".

A peer asks those it joins to open a plain TCP connection back to the address its own connection came from,
on the ports it listens on; the answer says which ports opened, and whether the answering peer is itself
publicly reachable (a peer that is can relay for others). Strict schemas, small caps: the asker is a stranger.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from garden.protocol.records import StrictRecord

MAX_REACH_PORTS = 4
"""Ports one check may ask about: a p2p daemon listens on one or two (TCP, and QUIC's UDP is not checked)."""
MAX_REACH_BYTES = 1024

Reachability = Literal["public", "private", "unknown"]
RelayLimitsSeen = Literal["", "garden", "libp2p-default", "unchecked"]
"""What a relaying peer's probe of its own relay found (``garden.net.relay_probe``); empty for peers that do not
relay. Said in ``/status`` only, never sent to other peers."""
Port = Annotated[int, Field(ge=1, le=65535)]


class ReachRequest(StrictRecord):
    """The ports the asker listens on (its TCP listen ports)."""

    ports: list[Port] = Field(min_length=1, max_length=MAX_REACH_PORTS)


class ReachReply(StrictRecord):
    """What the asked peer saw: the asker's address as it arrived (``observed``, an IP; None when the connection
    came through a relay or the peer could not tell), the ports that opened when dialled there, the asked peer's
    own reachability, and why nothing was dialled when ``error`` says so (``too soon``, ``bad request``)."""

    observed: str | None = Field(None, max_length=64)
    open: list[Port] = Field(default_factory=list, max_length=MAX_REACH_PORTS)
    reachability: Reachability = "unknown"
    error: str | None = Field(None, max_length=200)
